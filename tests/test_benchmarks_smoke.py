"""Tiny runs of the cost, accelerator and mechanism benchmarks: they start, compile, time and
report."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cost_benchmark_tiny(tmp_path):
    out = tmp_path / "cost.md"
    out.write_text("old tables\n<!-- notes -->\nhand-written analysis\n")
    run("benchmarks/cost.py", "--tiny", "--steps", "2", "--rounds", "1", "--batch", "2",
        "--side", "2", "--text-len", "4", "--methods", "alignprop", "leapalign",
        "--out", str(out))
    text = out.read_text()
    assert "| LeapAlign |" in text and "| AlignProp (remat) |" in text
    assert "### Goals" in text and "Load average" in text
    assert "old tables" not in text and text.endswith("<!-- notes -->\nhand-written analysis\n")


def test_flux_accelerator_tiny():
    text = run("benchmarks/flux_accelerator.py", "--tiny", "--dtype", "float32",
               "--remat", "none", "--no-torch")  # the torch comparison is for accelerators
    lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert float(lines["train_s_per_iter"]) > 0
    assert float(lines["train_flops_per_iter"]) > 0
    assert float(lines["jax_rollout_images_per_s"]) > 0
    assert "peak_hbm_gib" in lines and "train_mfu" in lines
    assert "torch_rollout: skipped" in text


def test_flux_accelerator_lora_and_flops_from_shapes():
    def keyed(text):
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    run_lines = keyed(run("benchmarks/flux_accelerator.py", "--tiny", "--lora-rank", "2",
                          "--scan-blocks", "--no-torch"))
    shape_lines = keyed(run("benchmarks/flux_accelerator.py", "--tiny", "--lora-rank", "2",
                            "--scan-blocks", "--flops-only"))
    assert "scan_blocks True" in run_lines["model"]
    adapters = int(run_lines["params"].split()[0])
    assert 0 < adapters < int(run_lines["frozen_base_params"].split()[0])
    assert float(run_lines["train_s_per_iter"]) > 0
    # The FLOPs come from the step's jaxpr, so shapes alone give the same count.
    assert run_lines["train_flops_per_iter"] == shape_lines["train_flops_per_iter"]
    assert "train_s_per_iter" not in shape_lines


def test_mechanism_tiny(tmp_path):
    run("benchmarks/mechanism.py", "--world", "random_flux", "--methods", "leapalign",
        "--batches", "1", "--batch-size", "2", "--num-steps", "3", "--out", str(tmp_path))
    import json

    result = json.loads((tmp_path / "mechanism.json").read_text())
    assert len(result["sigmas"]) == 3 and result["sigmas"][0] == 1.0
    for name in ("leapalign", "random direction"):
        assert abs(sum(result["shares"][name]) - 1.0) < 1e-6
        assert all(e > 0 for e in result["effects"][name])
    assert "| leapalign |" in (tmp_path / "mechanism.md").read_text()
    assert (tmp_path / "mechanism.png").stat().st_size > 1000


def test_compare_methods_tables_at_equal_iterations_and_equal_time():
    """The gain over the base ± its standard error over seeds, and each run's accuracy at
    LeapAlign's training time (the last evaluation point reached within it)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare_methods as cm

    def result(acc):
        return {"acc_overall": acc, "reward": 0.5, "fd": 1.0,
                **{f"acc_{c}": acc for c in cm.CATEGORIES}}

    def seed(points, s_per_iter=0.2):
        return {"points": [{"step": st, "train_s": t, "results": result(a)} for st, t, a in points],
                "s_per_iter": s_per_iter, "peak_mib": 100.0}

    base = {"points": [{"step": 0, "train_s": 0.0, "results": result(0.40)}]}
    rows = {
        "leapalign": {"label": "leapalign", "layout": "32 prompts", "seeds": {
            str(i): seed([(50, 10.0, 0.45), (100, 20.0, a)]) for i, a in enumerate((0.50, 0.52, 0.54))}},
        "alignprop": {"label": "alignprop", "layout": "32 prompts", "seeds": {
            str(i): seed([(50, 15.0, 0.47), (100, 30.0, 0.60)]) for i in range(3)}},
    }
    table, summary = cm.summarize(rows, base)
    assert abs(summary["leapalign"]["gain"] - 0.12) < 1e-9
    assert abs(summary["leapalign"]["gain_se"] - 0.02 / np.sqrt(3)) < 1e-9
    assert "| leapalign | 32 prompts | 0.5000 ± 0.0000 | 0.520 ± 0.020 | +0.120 ± 0.012 |" in table
    timed, by_time = cm.equal_time(rows, base)
    assert by_time["alignprop"]["budget_s"] == 20.0
    assert by_time["alignprop"]["iterations"] == [50, 50, 50]  # 100 took 30 s > 20 s
    assert abs(by_time["alignprop"]["gain"] - 0.07) < 1e-9
    assert abs(by_time["leapalign"]["gain"] - 0.12) < 1e-9
    assert "| alignprop | 50/50/50 | 0.470 ± 0.000 |" in timed


def test_mechanism_reads_the_gains_of_a_compare_methods_results_file(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import json

    import mechanism

    base = {"acc_overall": 0.4, "acc_position": 0.05, "acc_color_attr": 0.06}
    summary = {"leapalign": {k: {"mean": v + 0.1, "std": 0.01} for k, v in base.items()},
               "refl": {k: {"mean": v - 0.02, "std": 0.01} for k, v in base.items()}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"base": {"points": [{"results": base}]}, "summary": summary}))
    gains = mechanism.category_gains(str(path))
    assert set(gains) == {"leapalign", "refl"}
    assert all(abs(gains["leapalign"][k] - 0.1) < 1e-12 for k in ("position", "color_attr", "overall"))
    assert abs(gains["refl"]["overall"] + 0.02) < 1e-12

    # With gains the figure gains the early-share vs category-gain panel beside the profiles.
    import numpy as np

    sigmas = np.linspace(1.0, 0.1, 6)
    profiles = {name: np.full(6, 1 / 6) for name in ("leapalign", "refl", "random direction")}
    widths = {}
    for name, with_gains in (("one.png", None), ("two.png", gains)):
        mechanism.plot(profiles, sigmas, str(tmp_path / name), with_gains)
        widths[name] = int.from_bytes((tmp_path / name).read_bytes()[16:20], "big")
    assert widths["two.png"] > 1.5 * widths["one.png"]


def test_compare_methods_overrides_reach_every_runs_config():
    """--learning-rate, --hinge-lambda and --anchor-coef land in each job's config; left
    out, the config's values stay."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare_methods as cm

    job = dict(method="refl", cache_dir="/tmp/c", world={}, overrides={"anchor_coef": 1.0},
               seed=2, steps=3, batch_size=4, learning_rate=None, hinge_lambda=None)
    plain = cm.make_config(job)
    tuned = cm.make_config({**job, "learning_rate": 1e-4, "hinge_lambda": 0.6})
    assert (plain.method.hinge_lambda, plain.optim.learning_rate) == (1.0, 3e-5)
    assert (tuned.method.hinge_lambda, tuned.optim.learning_rate) == (0.6, 1e-4)
    assert tuned.method.anchor_coef == 1.0 and tuned.seed == 2 and tuned.train.steps == 3
    # --anchor-coef reaches every direct-gradient run; a run's own anchor override wins,
    # and GRPO, which has no velocity anchor, is left as it is.
    free = {**job, "overrides": {}}
    assert cm.make_config(free).method.anchor_coef == 0.0
    assert cm.make_config({**free, "anchor_coef": 0.5}).method.anchor_coef == 0.5
    assert cm.make_config({**job, "anchor_coef": 0.5}).method.anchor_coef == 1.0
    grpo = cm.make_config({**free, "method": "grpo", "anchor_coef": 0.5})
    assert "anchor_coef" not in grpo.method


def test_compare_methods_records_the_cpu_family_and_vector_isa():
    """Two CPUs of one name can round training differently; the record tells them apart."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import compare_methods as cm

    def cpuinfo(flags):
        return ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                f"model name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n\n"
                "processor\t: 1\nmodel name\t: other\n")

    assert cm.cpu_description(cpuinfo("avx avx2 avx512f avx512bw")) == (
        "AMD EPYC (family 25, model 17, avx512f)")
    assert cm.cpu_description(cpuinfo("avx avx2")) == "AMD EPYC (family 25, model 17, avx2)"
    assert cm.cpu_description("", "arm64") == "arm64"  # no /proc/cpuinfo: the fallback

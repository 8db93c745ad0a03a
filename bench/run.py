"""lorafit vs TRL SFTTrainer + PEFT vs a plain PEFT loop, on the same work, measured side by side.

    python -m bench.run --all                 tiny and small on the mixed workload, small on long and
                                              short chats, scaling runs, profile, memory; writes BENCHMARKS.md
    python -m bench.run --config small        one config (writes WORKDIR/BENCHMARKS.md)
    python -m bench.run --quick               smoke test of the harness (< 2 min)

Every tool trains in its own process (peak RSS per tool). The processes run together but take turns
step by step -- lorafit, PEFT loop, TRL, lorafit, PEFT loop, TRL, ... (see run_paced) -- so that
background load hits every tool alike; figures are medians over the timed steps. See
bench/README.md and BENCHMARKS.md for the definitions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.report import LABELS, TOOLS, print_tables, render

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
# --workload: the conversations (min, max tokens), rows per batch and packing; rows are 512 tokens
WORKLOADS = {
    "mixed": {"min_tokens": 30, "max_tokens": 500, "batch": 4, "packing": True},  # the default
    "long": {
        "min_tokens": 1000,
        "max_tokens": 1400,
        "batch": 4,
        "packing": True,
    },  # longer than a row: every row full
    "short": {
        "min_tokens": 30,
        "max_tokens": 70,
        "batch": 8,
        "packing": False,
    },  # short chats, padded, no packing
}


@dataclass
class Plan:
    configs: list[str]
    seq: int = 512
    batch: int = 4
    r: int = 16
    alpha: int = 32
    lr: float = 1e-3
    seed: int = 42
    warmup: int = 1
    steps: dict = field(default_factory=lambda: {"tiny": 8, "small": 5})  # timed steps per run
    rounds: int = 1
    n_train: int = 3000
    n_eval: int = 32
    max_tokens: int = 500
    scaling: bool = False
    profile: bool = False
    bf16_probe: bool = True
    seq_lengths: tuple = (256, 512, 1024, 2048)
    scaling_steps: int = 3
    data_multiplier: int = 10
    workload: str = "mixed"
    min_tokens: int = 30
    packing: bool = True
    # --all: the small config again on these workloads, each side by side like the main one
    extra_workloads: tuple = ()
    memory_workloads: tuple = ("mixed",)  # bench.memory --tensors runs of every tool (small), with profile


def section(size: str, workload: str) -> str:
    """The results key and report section of one config on one workload: "small", "small-long"."""
    return size if workload == "mixed" else f"{size}-{workload}"


def workload_plan(plan: Plan, workload: str) -> dict:
    """Rows per batch, packing and conversation lengths of `workload` (the plan's own for its workload)."""
    if workload == plan.workload:
        return {"batch": plan.batch, "packing": plan.packing, "min_tokens": plan.min_tokens,
                "max_tokens": plan.max_tokens}  # fmt: skip
    return dict(WORKLOADS[workload])


def data_key(plan: Plan, workload: str) -> str:
    return "data" if workload == plan.workload else f"data_{workload}"


# ----------------------------------------------------------------------------- processes


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    return env


class Worker:
    """One `python -m MODULE SPEC` process: its spec, log and result files, CPU time and stop state."""

    def __init__(self, module: str, spec: dict, work: Path, name: str):
        import psutil

        work.mkdir(parents=True, exist_ok=True)
        self.module, self.name = module, name
        self.spec = dict(
            spec, result=str(work / f"{name}.result.json"), progress=str(work / f"{name}.progress.jsonl")
        )
        Path(self.spec["progress"]).unlink(missing_ok=True)
        spec_path = work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(self.spec, indent=1))
        self.log_path = work / f"{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, str(spec_path)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env=_env(), start_new_session=True,
            )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)

    def failure(self) -> RuntimeError:
        tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-25:])
        return RuntimeError(
            f"{self.module} {self.name} failed (exit {self.proc.returncode}); log {self.log_path}:\n{tail}"
        )

    def wait_stopped(self, poll: float = 0.02) -> float:
        """Until the worker stops itself after an optimizer step (raises if it exits instead).

        Returns the largest resident set size seen meanwhile, in MB (sampled every `poll` seconds)."""
        import psutil

        rss = 0
        while True:
            if self.proc.poll() is not None:
                raise self.failure()
            try:
                if self.ps.status() == psutil.STATUS_STOPPED:
                    return rss / 2**20
                rss = max(rss, self.ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(poll)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def finish(self) -> dict:
        if self.proc.wait() != 0:
            raise self.failure()
        return json.loads(Path(self.spec["result"]).read_text())


def run_module(
    module: str, spec: dict, work: Path, name: str, *, cap_after_start: float | None = None
) -> dict:
    """Run one worker alone to its end and return its result.

    With `cap_after_start`, the worker is killed once its training has run that many seconds (its
    progress file says when training began) and {"capped": True, ...} is returned.
    """
    busy0, child0, t0 = _cpu_busy(), _children_cpu(), time.perf_counter()
    w = Worker(module, spec, work, name)
    try:
        while w.proc.poll() is None:
            if cap_after_start is not None:
                begun = _progress(w.spec["progress"]).get("train_begin")
                if begun is not None and time.time() - begun > cap_after_start:
                    w.kill()
                    return {"capped": True, "progress": _progress(w.spec["progress"])}
            time.sleep(0.25)
        res = w.finish()
    except BaseException:
        w.kill()
        raise
    wall = time.perf_counter() - t0
    # cores kept busy by OTHER processes meanwhile: all busy CPU time minus this child's, over the wall time
    res["background_cores"] = max(0.0, ((_cpu_busy() - busy0) - (_children_cpu() - child0)) / wall)
    return res


def run_paced(
    jobs: dict[str, dict], work: Path, *, warmup: int, steps: int, quiet_wait: float = 30.0
) -> dict:
    """Train several tools at once, one optimizer step at a time, in turn.

    Every worker stops itself after each optimizer step (bench.workers, "pause"). The warm-up steps
    run side by side (untimed); then, `steps` times over, each tool in `jobs` order is continued for
    exactly one step while the others stay stopped: A, B, C, A, B, C, ... Before each such cycle the
    CPU is given up to `quiet_wait` seconds to become quiet (other processes below QUIET cores). For
    each timed step the cores used by other processes meanwhile are recorded ("step_background").
    """
    workers = {
        name: Worker("bench.workers", dict(spec, pause=True), work, name) for name, spec in jobs.items()
    }
    background: dict[str, list[float]] = {name: [] for name in jobs}
    step_rss: dict[str, list[float]] = {name: [] for name in jobs}
    try:
        for k in range(warmup):
            for w in workers.values():
                w.wait_stopped()
            if k < warmup - 1:
                for w in workers.values():
                    w.cont()
        waited = []
        for _ in range(steps):
            waited.append(wait_for_quiet(quiet_wait))
            for name, w in workers.items():
                busy0, cpu0, t0 = _cpu_busy(), w.cpu(), time.perf_counter()
                w.cont()
                step_rss[name].append(w.wait_stopped(poll=0.01))
                wall = time.perf_counter() - t0
                background[name].append(max(0.0, ((_cpu_busy() - busy0) - (w.cpu() - cpu0)) / wall))
        for w in workers.values():
            w.cont()  # save and exit
        out = {}
        for name, w in workers.items():
            out[name] = w.finish()
            out[name]["step_background"] = background[name]
            out[name]["step_peak_rss_mb"] = step_rss[name]
            out[name]["quiet_waits"] = waited
        return out
    except BaseException:
        for w in workers.values():
            w.kill()
        raise


QUIET = 0.25  # cores used by other processes below which the CPU counts as quiet


def wait_for_quiet(limit: float, sample: float = 0.5) -> float:
    """Wait until other processes use < QUIET cores (0.5 s samples; our workers are all stopped), at most
    `limit` seconds. Returns the seconds waited."""
    import psutil

    t0 = time.perf_counter()
    ncpu = psutil.cpu_count() or 1
    while True:
        busy = psutil.cpu_percent(interval=sample) / 100 * ncpu
        waited = time.perf_counter() - t0
        if busy < QUIET or waited >= limit:
            return waited


def _cpu_busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _progress(path: str) -> dict:
    out: dict = {"steps": []}
    try:
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] == "train_begin":
                out["train_begin"] = rec["time"]
            elif rec["event"] == "step":
                out["steps"].append(rec["time"])
    except (OSError, ValueError):
        pass
    return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- measurements


def step_times(res: dict) -> list[float]:
    """Seconds of every optimizer step (the first includes whatever preceded it)."""
    ends, resumes = res["step_end"], res["step_resume"]
    return [ends[0] - res["t_train_start"]] + [b - a for a, b in zip(resumes, ends[1:])]


def timed(res: dict, warmup: int) -> list[tuple[float, int]]:
    """(seconds, tokens) of every step after the warm-up."""
    return list(zip(step_times(res), res["step_tokens"]))[warmup:]


def summarize(runs: list[dict], warmup: int) -> dict:
    steps = [st for res in runs for st in timed(res, warmup)]
    per_step = [tok / sec for sec, tok in steps]
    per_run = [sum(t for _, t in timed(r, warmup)) / sum(s for s, _ in timed(r, warmup)) for r in runs]
    step_sec = statistics.median(s for s, _ in steps)
    bg = [
        x
        for r in runs
        for x in r.get("step_background", [r.get("background_cores", 0.0)] * len(timed(r, warmup)))
    ]
    quiet = [v for v, b in zip(per_step, bg) if b < QUIET]
    return {
        "tokens_per_sec": statistics.median(per_step),
        "tokens_per_sec_steps": per_step,
        "tokens_per_sec_quiet": statistics.median(quiet) if quiet else None,
        "quiet_steps": len(quiet),
        "tokens_per_sec_best": max(per_step),
        "tokens_per_sec_runs": per_run,
        "step_sec_median": step_sec,
        "step_secs": [s for s, _ in steps],
        "tokens_per_step": statistics.median(t for _, t in steps),
        "timed_steps": len(steps),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_rss_runs": [r["peak_rss_mb"] for r in runs],
        "rss_between_steps_mb": statistics.median(x for r in runs for x in r["step_rss_mb"][warmup:]),
        # largest RSS sampled (every 10 ms) during the timed steps; None for runs that were not paced
        "rss_in_steps_mb": max((x for r in runs for x in r.get("step_peak_rss_mb", [])), default=None),
        "precision": runs[0].get("precision"),
        # from the worker's start to the end of its first step, minus one typical step
        "setup_sec": statistics.median(r["step_end"][0] - r["t_main"] - step_sec for r in runs),
        "background_cores": bg,
    }


def _machine(work: Path, tag: str, what: str = "matmul") -> dict:
    """bench.machine in its own process: machine facts, or the fp32/bf16 matmul throughput."""
    if what == "matmul":
        say(f"measuring fp32 and bf16 matmul throughput ({tag})")
    out = work / f"machine_{tag}.json"
    subprocess.run([sys.executable, "-m", "bench.machine", str(out), what], cwd=ROOT, env=_env(), check=True)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- phases


def prepare_inputs(plan: Plan, work: Path) -> dict:
    from bench.data import write_dataset
    from lorafit.tiny import write_tiny_model

    inputs: dict = {"models": {}}
    for workload in dict.fromkeys((plan.workload, *plan.extra_workloads)):
        w = workload_plan(plan, workload)
        say(f"writing the synthetic dataset of the {workload} workload ({plan.n_train} train / {plan.n_eval} eval "
            f"conversations of {w['min_tokens']}-{w['max_tokens']} tokens)")  # fmt: skip
        inputs[data_key(plan, workload)] = write_dataset(
            work / ("data" if workload == "mixed" else f"data_{workload}"), plan.n_train, plan.n_eval,
            max_tokens=w["max_tokens"], min_tokens=w["min_tokens"], row=plan.seq,
        )  # fmt: skip
    for size in sorted(set(plan.configs) | ({"small"} if plan.scaling or plan.profile else set())):
        inputs["models"][size] = str(write_tiny_model(work / "models" / size, size=size, vocab_size=VOCAB))
    if plan.scaling:
        short = min(plan.seq_lengths) - 6
        inputs["data_scaling"] = write_dataset(work / "data_scaling", plan.n_train, 8, max_tokens=short)
        n = plan.n_train * plan.data_multiplier
        say(f"writing the {plan.data_multiplier}x dataset ({n} conversations)")
        inputs["data_big"] = write_dataset(work / "data_big", n, 8, max_tokens=plan.max_tokens)
    return inputs


def base_spec(plan: Plan, model: str, train: str, workload: str | None = None) -> dict:
    w = workload_plan(plan, workload or plan.workload)
    return {"model": model, "train": train, "batch": w["batch"], "seq": plan.seq, "lr": plan.lr, "r": plan.r,
            "alpha": plan.alpha, "seed": plan.seed, "vocab": VOCAB, "packing": w["packing"]}  # fmt: skip


def run_config(plan: Plan, size: str, inputs: dict, work: Path, precision: str, workload: str) -> dict:
    """The three tools side by side on one config and workload; then the TRL precision probe and the
    common evaluator."""
    from bench.flops import flops_per_token

    name = section(size, workload)
    data = inputs[data_key(plan, workload)]
    cwork = work / name
    total = plan.warmup + plan.steps[size]
    spec0 = base_spec(plan, inputs["models"][size], data["train"], workload)
    runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
    for rnd in range(plan.rounds):
        say(f"{name}: round {rnd + 1}/{plan.rounds}: {', '.join(LABELS[t] for t in TOOLS)} side by side, "
            f"{plan.warmup} warm-up step(s) together, then {plan.steps[size]} timed steps in turn")  # fmt: skip
        jobs = {
            f"r{rnd}_{tool}": dict(
                spec0, tool=tool, steps=total, precision=precision, out=str(cwork / f"r{rnd}_{tool}")
            )
            for tool in TOOLS
        }
        res = run_paced(jobs, cwork, warmup=plan.warmup, steps=plan.steps[size])
        for tool in TOOLS:
            runs[tool].append(res[f"r{rnd}_{tool}"])
    out: dict = {"size": size, "workload": workload, "data_key": data_key(plan, workload), "batch": spec0["batch"],
                 "packing": spec0["packing"], "lorafit_pads": False, "steps_per_run": total, "warmup": plan.warmup, "tools": {}}  # fmt: skip
    for tool in TOOLS:
        out["tools"][tool] = summarize(runs[tool], plan.warmup)
        out["tools"][tool]["losses_round1"] = runs[tool][0]["losses"]
    if plan.bf16_probe:
        other = "bf16" if precision == "fp32" else "fp32"
        ref = min(out["tools"]["trl"]["step_secs"])  # its least disturbed step
        cap = 2.5 * ref  # for warm-up + 1 step: "not finished" means slower than the reference
        say(f"{name}: TRL precision probe, {other} (stopped after {cap:.0f} s of training)")
        spec = dict(
            spec0, tool="trl", steps=plan.warmup + 1, precision=other, out=str(cwork / f"probe_{other}")
        )
        probe = {
            "precision": other,
            "cap_sec": cap,
            "reference_step_sec": ref,
            "reference_precision": precision,
        }
        try:
            res = run_module("bench.workers", spec, cwork, f"probe_trl_{other}", cap_after_start=cap)
        except RuntimeError as e:  # a failed probe is reported, not fatal
            res = {"failed": str(e).splitlines()[0]}
            say(f"{name}: the probe failed: {res['failed']}")
        if res.get("failed"):
            probe.update(failed=res["failed"])
        elif res.get("capped"):
            done = len(res["progress"]["steps"])
            probe.update(capped=True, steps_done=done, step_sec_lower_bound=cap / (plan.warmup + 1))
        else:
            probe.update(capped=False, step_sec=step_times(res)[-1], peak_rss_mb=res["peak_rss_mb"])
        out["trl_precision_probe"] = probe
    say(f"{name}: evaluating every adapter with the same evaluator")
    adapters = {"base model": None} | {t: str(cwork / f"r0_{t}") for t in TOOLS}
    ev = run_module(
        "bench.evaluate", {"model": inputs["models"][size], "eval": data["eval"], "adapters": adapters},
        cwork, "evaluate",
    )  # fmt: skip
    out["eval"] = {k: v for k, v in ev.items() if isinstance(v, dict) and "eval_loss" in v}
    d = data
    out["flops"] = flops_per_token(size, plan.r, d["target_fraction"], d["mean_context"])
    return out


def run_scaling(plan: Plan, inputs: dict, work: Path, precision: str) -> dict:
    """lorafit alone (small config): sequence lengths at a fixed token budget, and 1x vs Nx conversations.

    Each group's runs are interleaved step by step like the tool comparison (run_paced)."""
    swork = work / "scaling"
    model = inputs["models"]["small"]
    total = plan.warmup + plan.scaling_steps
    budget = plan.seq * plan.batch
    out: dict = {"tokens_per_batch": budget, "steps_per_run": total, "seq": {}}
    say(f"scaling: lorafit small at seq {', '.join(map(str, plan.seq_lengths))} ({budget} tokens per batch), "
        "interleaved")  # fmt: skip
    jobs = {}
    for seq in plan.seq_lengths:
        jobs[f"seq{seq}"] = dict(base_spec(plan, model, inputs["data_scaling"]["train"]), tool="lorafit", steps=total,
                                 seq=seq, batch=max(1, budget // seq), precision=precision, out=str(swork / f"seq{seq}"))  # fmt: skip
    res = run_paced(jobs, swork, warmup=plan.warmup, steps=plan.scaling_steps)
    for seq in plan.seq_lengths:
        out["seq"][seq] = summarize([res[f"seq{seq}"]], plan.warmup) | {"batch": jobs[f"seq{seq}"]["batch"]}
    m = plan.data_multiplier
    say(f"scaling: lorafit small on 1x and {m}x conversations, interleaved")
    jobs = {
        name: dict(base_spec(plan, model, inputs[key]["train"]), tool="lorafit", steps=total, precision=precision,
                   out=str(swork / name))
        for name, key in (("data_1x", "data"), (f"data_{m}x", "data_big"))
    }  # fmt: skip
    res = run_paced(jobs, swork, warmup=plan.warmup, steps=plan.scaling_steps)
    out["data"] = {
        name: summarize([res[name]], plan.warmup) | {"conversations": inputs[key]["n_train"]}
        for name, key in (("data_1x", "data"), (f"data_{m}x", "data_big"))
    }
    return out


def run_memory(plan: Plan, inputs: dict, work: Path, precision: str) -> dict:
    """Each tool alone on small under bench.memory --tensors, per workload of `plan.memory_workloads`: live
    tensor bytes and the RSS timeline. {section: {tool: result}}."""
    out: dict = {}
    for workload in plan.memory_workloads:
        name = section("small", workload)
        data = inputs[data_key(plan, workload)]
        out[name] = {}
        for tool in TOOLS:
            say(f"memory: {LABELS[tool]} on {name} under torch.profiler (profile_memory)")
            spec = dict(base_spec(plan, inputs["models"]["small"], data["train"], workload), tool=tool, tensors=True,
                        steps=plan.warmup + 2, precision=precision, out=str(work / "memory" / name / tool))  # fmt: skip
            res = run_module("bench.memory", spec, work / "memory", f"memory_{name}_{tool}")
            res["tensors"].pop("timeline", None)
            out[name][tool] = res
    return out


def run_profile(plan: Plan, inputs: dict, work: Path, precision: str, workload: str = "mixed") -> dict:
    name = section("small", workload)
    say(f"profiling lorafit's step on {name} (torch.profiler)")
    spec = dict(base_spec(plan, inputs["models"]["small"], inputs[data_key(plan, workload)]["train"], workload),
                tool="lorafit", precision=precision, out=str(work / f"profile-{name}" / "out"), warmup=plan.warmup,
                profile_steps=2)  # fmt: skip
    return run_module("bench.profile", spec, work / f"profile-{name}", "profile")


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true",
                   help="tiny and small (mixed), small on long and short chats, scaling, profile, memory")  # fmt: skip
    g.add_argument("--config", choices=["tiny", "small"], action="append", help="one config (repeatable)")
    g.add_argument("--quick", action="store_true", help="smoke test: tiny, short rows, one round")
    g.add_argument("--render", action="store_true", help="only rewrite the report from WORKDIR/results.json")
    ap.add_argument("--steps", type=int, help="timed steps per run (after the warm-up), for every config")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run (not timed); default 1")
    ap.add_argument(
        "--rounds", type=int, help="repeat the interleaved runs R times (new processes); default 1"
    )
    ap.add_argument("--lr", type=float, help="learning rate for every tool; default 1e-3")
    ap.add_argument("--workdir", default="/tmp/lorafit-bench", help="models, data, logs and raw results")
    ap.add_argument("--report", help="markdown report path (default: BENCHMARKS.md for --all, else WORKDIR/)")
    ap.add_argument("--no-probe", action="store_true", help="skip the TRL bf16/fp32 probe")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed",
                    help="mixed: 30-500-token chats, 4 packed rows (default); long: 1,000-1,400-token chats, "
                         "4 full packed rows; short: 30-70-token chats, batch 8, no packing")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        plan = Plan(configs=["tiny"], seq=128, batch=2, warmup=1, steps={"tiny": 2}, rounds=1, n_train=300,
                    n_eval=8, max_tokens=120, bf16_probe=False)  # fmt: skip
    elif args.all or args.render:
        plan = Plan(configs=["tiny", "small"], scaling=True, profile=True, extra_workloads=("long", "short"),
                    memory_workloads=("mixed", "long"))  # fmt: skip
    else:
        plan = Plan(configs=list(dict.fromkeys(args.config)))
    if args.steps is not None:
        plan.steps = {k: args.steps for k in plan.steps}
    if args.warmup is not None:
        plan.warmup = args.warmup
    if args.rounds is not None:
        plan.rounds = args.rounds
    if args.lr is not None:
        plan.lr = args.lr
    if args.no_probe:
        plan.bf16_probe = False
    if args.workload != "mixed":
        if args.all:
            ap.error("--all runs every workload; --workload is for --config")
        w = WORKLOADS[args.workload]
        plan.workload, plan.batch, plan.packing = args.workload, w["batch"], w["packing"]
        plan.min_tokens, plan.max_tokens = w["min_tokens"], w["max_tokens"]
        plan.memory_workloads = (args.workload,)
    return args, plan


def main(argv: list[str] | None = None) -> int:

    args, plan = parse(argv)
    if args.render:
        results = json.loads((Path(args.workdir) / "results.json").read_text())
        report = Path(args.report) if args.report else ROOT / "BENCHMARKS.md"
        report.write_text(render(results))
        say(f"wrote {report} from {Path(args.workdir) / 'results.json'}")
        return 0
    command = "python -m bench.run " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    say(f"{command}  (workdir {work})")
    results: dict = {
        "command": command,
        "plan": asdict(plan),
        "started": started.isoformat(timespec="seconds"),
    }
    results["machine"] = _machine(work, "facts", "facts")["facts"]
    results["matmul"] = [_machine(work, "start")["matmul"]]
    mm = results["matmul"][0]
    precision = "fp32" if mm["fp32"] >= mm["bf16"] else "bf16"
    say(f"matmul: fp32 {mm['fp32']:.1f} GFLOP/s, bf16 {mm['bf16']:.1f} GFLOP/s -> peers train in {precision}")
    results["precision"] = precision
    inputs = prepare_inputs(plan, work)
    results["data"] = {k: v for k, v in inputs.items() if k.startswith("data")}
    results["configs"] = {}
    for size in plan.configs:
        results["configs"][section(size, plan.workload)] = run_config(
            plan, size, inputs, work, precision, plan.workload
        )
    for workload in plan.extra_workloads:
        results["configs"][section("small", workload)] = run_config(
            plan, "small", inputs, work, precision, workload
        )
    if plan.scaling:
        results["scaling"] = run_scaling(plan, inputs, work, precision)
    if plan.profile:
        results["profile"] = run_profile(plan, inputs, work, precision)
        if "short" in plan.extra_workloads:  # per-step fixed costs: Python, optimizer, logging, collation
            results["profiles"] = {"small-short": run_profile(plan, inputs, work, precision, "short")}
        results["memory"] = run_memory(plan, inputs, work, precision)
    if not args.quick:
        results["matmul"].append(_machine(work, "end")["matmul"])
    results["duration_min"] = (time.perf_counter() - t0) / 60
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_tables(results)
    report = (
        Path(args.report) if args.report else (ROOT / "BENCHMARKS.md" if args.all else work / "BENCHMARKS.md")
    )
    report.write_text(render(results))
    say(f"wrote {report} and {work / 'results.json'} ({results['duration_min']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nemo-lossfree simulate``: the expert-bias dynamics offline; recommend an update rate.

    nemo-lossfree simulate --experts 256 --topk 8 --tokens 65536 --steps 500
    nemo-lossfree simulate --score-function softmax --rates 1e-5 3e-5 1e-4 3e-4
    nemo-lossfree simulate --scores router_logits.pt --topk 8 --out-dir runs/simulate

Routes synthetic scores (skewed expert popularity, drifting over time, with
per-step noise) or scores recorded from a run (``--scores``: a ``.pt`` tensor
``[steps, tokens, experts]`` or ``[tokens, experts]`` of router logits, or
of scores with ``--scores-kind scores``; a dict with one key ``logits`` or
``scores`` says so itself). Compares the update rules and schedules on
MaxVio_batch, the steps to reach ``--target-maxvio`` and the cumulative
regret (sum of MaxVio_batch over the steps), scans ``--rates`` and
recommends the one with the smallest regret. Writes ``simulate.json`` and
``simulate.png`` to ``--out-dir``.

Drift and noise are in score units (sigmoid scores lie in (0, 1), softmax
scores near 1/E), like the bias itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from nemo_lossfree.apps.commands import check_output_dir
from nemo_lossfree.config import SCHEDULES, UPDATE_RULES, LossFreeConfig
from nemo_lossfree.exit_codes import EXIT_USAGE


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    from nemo_lossfree.apps.simulator import DEFAULT_RATES, STRATEGIES
    from nemo_lossfree.apps.simulator.scores import SCORE_KINDS
    from nemo_lossfree.scores import SCORE_FUNCTIONS

    p = subparsers.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("shape")
    g.add_argument("--experts", type=_positive_int, default=256, help="(default %(default)s; from --scores if given)")
    g.add_argument("--topk", type=_positive_int, default=8, help="(default %(default)s)")
    g.add_argument("--tokens", type=_positive_int, default=16384,
                   help="tokens per step, i.e. per global batch and layer (default %(default)s)")
    g.add_argument("--steps", type=_positive_int, default=300, help="(default %(default)s)")
    g.add_argument("--score-function", choices=SCORE_FUNCTIONS, default="sigmoid", help="(default %(default)s)")
    g = p.add_argument_group("synthetic scores")
    g.add_argument("--skew", type=_nonnegative_float, default=0.3,
                   help="spread of expert popularity, logit units (default %(default)s)")
    g.add_argument("--pool-tokens", type=_positive_int, default=None,
                   help="distinct tokens to draw steps from (default 4 x --tokens, at most 2^20)")
    g = p.add_argument_group("recorded scores")
    g.add_argument("--scores", default=None, metavar="FILE",
                   help=".pt tensor [steps, tokens, experts] or [tokens, experts]")
    g.add_argument("--scores-kind", choices=SCORE_KINDS, default=None, help="what a bare tensor holds (default logits)")
    g = p.add_argument_group("environment (both sources)")
    g.add_argument("--drift", type=_nonnegative_float, default=1e-4,
                   help="random-walk step of expert popularity per step, score units (default %(default)s)")
    g.add_argument("--noise", type=_nonnegative_float, default=0.0,
                   help="per-step popularity noise, score units (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("strategies and rates")
    g.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    g.add_argument("--rate", type=_nonnegative_float, default=1e-3,
                   help="base update rate of the strategy comparison (default %(default)s)")
    g.add_argument("--rates", type=_nonnegative_float, nargs="+", default=list(DEFAULT_RATES),
                   help="rates to scan for the recommendation (default %(default)s)")
    g.add_argument("--rule", choices=UPDATE_RULES, default="sign", help="rule of the rate scan (default %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="schedule of the rate scan (default %(default)s)")
    g.add_argument("--no-center", dest="center", action="store_false", help="rate scan without re-centering")
    g.add_argument("--target-maxvio", type=_nonnegative_float, default=0.2, help="(default %(default)s)")
    g.add_argument("--window", type=_positive_int, default=10,
                   help="steps whose mean MaxVio must reach the target (default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/simulate", help="(default %(default)s)")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads (default %(default)s: the throughput is reported per core)")
    return p


def _environment(args):
    from nemo_lossfree.apps.simulator import Environment, SyntheticPool, load_recorded

    if args.scores:
        if not os.path.isfile(args.scores):
            raise ValueError(f"--scores: no such file: {args.scores}")
        pools = load_recorded(args.scores, kind=args.scores_kind, score_function=args.score_function)
        source = {"kind": "recorded", "file": args.scores, "recorded_steps": len(pools),
                  "recorded_tokens": pools[0].num_tokens}
    else:
        if args.scores_kind:
            raise ValueError("--scores-kind: only meaningful with --scores")
        pool_tokens = args.pool_tokens or min(4 * args.tokens, 2 ** 20)
        pools = [SyntheticPool(num_tokens=pool_tokens, num_experts=args.experts,
                               score_function=args.score_function, skew=args.skew, seed=args.seed)]
        source = {"kind": "synthetic", "pool_tokens": pool_tokens, "skew": args.skew}
    experts = pools[0].num_experts
    if args.topk > experts:
        raise ValueError(f"--topk: must be <= the number of experts ({experts}), got {args.topk}")
    env = Environment(pools, topk=args.topk, tokens_per_step=args.tokens, steps=args.steps,
                      drift=args.drift, noise=args.noise, seed=args.seed)
    source.update(drift=args.drift, noise=args.noise, experts=experts)
    return env, source


def run(args) -> int:
    from nemo_lossfree.apps.simulator import compare_strategies, recommend, scan_rates
    from nemo_lossfree.apps.simulator.report import write_json, write_plot

    torch.set_num_threads(args.threads)
    try:
        base = LossFreeConfig(update_rule=args.rule, schedule=args.schedule, center=args.center,
                              decay_steps=max(1, args.steps // 10),
                              warmup_steps=max(1, args.steps // 10) if args.schedule == "linear_warmup" else 0)
        env, source = _environment(args)
        # Before the simulation, which can take minutes: its results go there.
        check_output_dir(args.out_dir, "--out-dir", create=True)
    except ValueError as exc:
        print(f"nemo-lossfree simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE

    started = time.perf_counter()
    strategies = compare_strategies(env, args.strategies, rate=args.rate)
    scan = scan_rates(env, sorted(set(args.rates)), base=base)
    wall_s = time.perf_counter() - started
    choice = recommend(scan, target=args.target_maxvio, window=args.window)
    traces = strategies + scan
    tokens = sum(t.tokens for t in traces)
    # CPU time, not wall time: other processes share the machine. With one
    # thread this is the time of one core.
    routing_s = sum(t.cpu_seconds for t in traces)
    throughput = {
        "threads": torch.get_num_threads(),
        "cpu_seconds": routing_s,
        "wall_seconds": sum(t.seconds for t in traces),
        "tokens_per_s": tokens / routing_s,
        # One token-routing = one token assigned to one of its top-K experts.
        "token_routings_per_s": tokens * args.topk / routing_s,
        "token_expert_scores_per_s": tokens * env.num_experts / routing_s,
        "setup_s": env.setup_s,
        "candidates_per_token": env.candidates,
        "fallback_tokens": env.fallback_tokens,
        "refreshed_blocks": env.refreshed_blocks,
    }
    document = {
        "command": "nemo-lossfree simulate " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []),
        "shape": {"experts": env.num_experts, "topk": args.topk, "tokens_per_step": env.tokens_per_step[0],
                  "steps": args.steps, "score_function": args.score_function},
        "source": source,
        "tokens_repeat_within_a_step": env.repeats_tokens,
        "target_maxvio": args.target_maxvio,
        "window": args.window,
        "regret_definition": "sum over steps of MaxVio_batch",
        "strategies": [t.summary(args.target_maxvio, args.window) for t in strategies],
        "rate_scan": [t.summary(args.target_maxvio, args.window) for t in scan],
        "recommendation": choice,
        "throughput": throughput,
        "wall_s": wall_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "traces": {t.name: t.maxvio for t in traces},
    }
    json_path = os.path.join(args.out_dir, "simulate.json")
    write_json(json_path, document)
    if args.plot:
        title = (f"{source['kind']} scores, E={env.num_experts}, K={args.topk}, "
                 f"{env.tokens_per_step[0]} tokens/step, {args.score_function}")
        write_plot(os.path.join(args.out_dir, "simulate.png"), strategies, scan,
                   choice["update_rate"], args.target_maxvio, title)

    print(f"{'strategy':>14} {'regret':>9} {'steady':>8} {'steps to ' + format(args.target_maxvio, 'g'):>14}")
    for t in strategies + scan:
        s = t.summary(args.target_maxvio, args.window)
        reach = "-" if s["steps_to_target"] is None else str(s["steps_to_target"])
        print(f"{t.name:>14} {s['cumulative_regret']:9.3f} {s['steady_maxvio']:8.4f} {reach:>14}")
    print(f"recommended update rate: {choice['update_rate']:g} ({choice['criterion']})")
    print(f"throughput: {throughput['token_routings_per_s']:.3g} token-routings/s "
          f"({throughput['tokens_per_s']:.3g} tokens/s) on {throughput['threads']} thread(s)")
    print(f"wrote {json_path}" + (" and simulate.png" if args.plot else ""))
    return 0

"""Federated LoRA fine-tuning of a small MLP on scikit-learn's digits, one Flower run per strategy.

A 64→48→32→10 MLP is pretrained centrally on the original digits. Four
clients then fine-tune PEFT LoRA adapters (on all three layers) on feature
non-IID domains: original, rotated 90°, shifted by two pixels, mirrored. Every strategy
that `lora_agg` finds (templates skipped) runs the same federation through
Flower's strategy loop, once with equal ranks (4, 4, 4, 4) and once with
heterogeneous ranks (2, 4, 6, 8) for the strategies that accept them.

Flower's simulation engine needs Ray, which is not installable offline here,
so the runs use :class:`lora_agg.flower.InProcessGrid`: the real ``ClientApp``
and ``Strategy.start`` loop, with the nodes called one after another in this
process.

Writes into ``--out``: ``results.csv`` (every round), ``summary.md`` and
``summary.csv`` (one row per run), and ``strategies.png`` / ``.svg`` (global
test accuracy, accuracy of what each client receives, aggregation error).

    python python/examples/federated_digits.py --out out/digits
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

DOMAINS = ["original", "rotated", "shifted", "mirrored"]
EQUAL_RANKS = (4, 4, 4, 4)
MIXED_RANKS = (2, 4, 6, 8)
LORA_ALPHA = 8.0
TARGETS = ["fc1", "fc2", "head"]


def transform(images: np.ndarray, domain: str) -> np.ndarray:
    """A feature domain: the same digits seen through a different transformation."""
    if domain == "original":
        return images
    if domain == "rotated":
        return np.rot90(images, k=1, axes=(1, 2)).copy()
    if domain == "shifted":  # two pixels right and down, zero-filled
        shifted = np.zeros_like(images)
        shifted[:, 2:, 2:] = images[:, :-2, :-2]
        return shifted
    if domain == "mirrored":
        return images[:, :, ::-1].copy()
    raise ValueError(domain)


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.25, random_state=seed,
                                                        stratify=digits.target)
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x_train)), len(DOMAINS))
    clients = [(transform(x_train[idx], d).reshape(len(idx), -1), y_train[idx]) for idx, d in zip(parts, DOMAINS)]
    tests = [(transform(x_test, d).reshape(len(x_test), -1), y_test) for d in DOMAINS]
    pretrain = (x_train.reshape(len(x_train), -1), y_train)
    return pretrain, clients, tests


def build_model():
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 48)
            self.fc2 = torch.nn.Linear(48, 32)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    return MLP()


def train(model, x, y, epochs, lr, batch, seed):
    import torch
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    xs, ys = torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.int64))
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def accuracy_dense(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the plain MLP given dense weights (no PEFT needed to evaluate)."""
    h = np.maximum(x @ weights["fc1.weight"].T + weights["fc1.bias"], 0)
    h = np.maximum(h @ weights["fc2.weight"].T + weights["fc2.bias"], 0)
    logits = h @ weights["head.weight"].T + weights["head.bias"]
    return float(np.mean(np.argmax(logits, axis=1) == y))


def make_client_app(base_state, client_data, ranks, local_epochs, lr):
    """The Flower ClientApp: LoRA fine-tuning of the pretrained MLP on one domain.

    It captures only plain data (no strategy, no ctypes object), so Ray can
    ship it to its worker processes. The node's partition (its domain and
    rank) comes from ``context.node_config["partition-id"]``.
    """
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from lora_agg import flower as lf
    app = ClientApp()

    @app.train()
    def fit(message, context):
        import peft
        import torch
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        config = lora_config(ranks[partition])
        view = lf.client_state_dict(lf.from_array_record(message.content["arrays"]), config)
        model = build_model()
        state = {k: torch.from_numpy(v.copy()) for k, v in base_state.items()}
        for key, delta in view.base_weight_deltas().items():
            state[key] = state[key] + torch.from_numpy(delta.astype(np.float32))
        model.load_state_dict(state)
        model = peft.get_peft_model(model, config)
        peft.set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in view.lora.items()})
        if message.content["config"].get(lf.FREEZE_A_KEY, False):
            for name, parameter in model.named_parameters():
                if "lora_A" in name:
                    parameter.requires_grad_(False)
        x, y = client_data[partition]
        server_round = int(message.content["config"]["server-round"])
        loss = train(model, x, y, local_epochs, lr, 32, seed=1000 * server_round + partition)
        trained = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
        return Message(RecordDict({"arrays": lf.to_array_record(trained),
                                   "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss}),
                                   lf.LORA_CONFIG_KEY: lf.lora_config_record(config),
                                   "client-info": ConfigRecord({"partition-id": partition})}), reply_to=message)

    return app


def lora_config(rank):
    import peft
    return peft.LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0)


class Federation:
    """One strategy, one rank setting: a Flower run with four nodes."""

    def __init__(self, args, base_state, clients, tests, ranks, strategy_name, registry):
        from lora_agg import flower as lf
        self.args, self.base, self.clients, self.tests, self.ranks = args, base_state, clients, tests, ranks
        self.configs = [lora_config(r) for r in ranks]
        #: node id -> partition, learned from the replies (Ray's node ids are random).
        self.partition_of: dict[int, int] = {}
        federation = self

        class Strategy(lf.LoraAggStrategy):
            def aggregate_train(self, server_round, replies):
                replies = list(replies)
                for reply in replies:
                    if not reply.has_error():
                        info = reply.content.config_records["client-info"]
                        federation.partition_of[reply.metadata.src_node_id] = int(info["partition-id"])
                return super().aggregate_train(server_round, replies)

        self.strategy = Strategy(strategy_name, registry=registry, track_error=True, fraction_evaluate=0.0,
                                 min_available_nodes=len(ranks), min_train_nodes=len(ranks))
        self.rows = []

    def dense(self, arrays, config=None):
        """Base + accumulated residual + s·B·A; with a client config, what that client would load."""
        from lora_agg import flower as lf
        from lora_agg.peft import module_name
        weights = {k: v.astype(np.float64) for k, v in self.base.items()}
        if config is None:
            for key in arrays:
                if key.endswith(lf.SCALING_SUFFIX):
                    module = key[: -len(lf.SCALING_SUFFIX)]
                    name = module_name(module)
                    update = float(arrays[key]) * (arrays[f"{module}.lora_B.weight"].astype(np.float64)
                                                   @ arrays[f"{module}.lora_A.weight"])
                    if module + lf.RESIDUAL_U_SUFFIX in arrays:
                        update += arrays[module + lf.RESIDUAL_U_SUFFIX].astype(np.float64) @ arrays[module + lf.RESIDUAL_V_SUFFIX]
                    weights[name + ".weight"] += update
            return weights
        view = lf.client_state_dict(arrays, config)
        for key, delta in view.base_weight_deltas().items():
            weights[key] += delta
        scaling = config.lora_alpha / config.r
        for key, a in view.lora.items():
            if ".lora_A." in key:
                module = key[: key.index(".lora_A.")]
                b = view.lora[f"{module}.lora_B.weight"]
                weights[module_name(module) + ".weight"] += scaling * (b.astype(np.float64) @ a)
        return weights

    def evaluate(self, server_round, record):
        from flwr.app import MetricRecord
        from lora_agg import flower as lf
        arrays = lf.from_array_record(record)
        global_weights = self.dense(arrays)
        accuracy = float(np.mean([accuracy_dense(global_weights, x, y) for x, y in self.tests]))
        node_of = {partition: node for node, partition in self.partition_of.items()}
        received = []
        for partition, config in enumerate(self.configs):
            own = self.strategy.lora.arrays_for(f"node-{node_of.get(partition)}", arrays)
            x, y = self.tests[partition]
            received.append(accuracy_dense(self.dense(own, config), x, y))
        errors = self.strategy.lora.errors[server_round - 1] if server_round > 0 else {"global": np.nan, "received": np.nan}
        self.rows.append({"round": server_round, "accuracy": accuracy, "received_accuracy": float(np.mean(received)),
                          "aggregation_error": errors["global"], "received_error": errors["received"]})
        return MetricRecord({"accuracy": accuracy})

    def initial_arrays(self):
        import peft
        import torch
        from lora_agg import flower as lf
        torch.manual_seed(self.args.seed)  # one shared initial adapter: A0 is common to all clients
        widest = max(self.configs, key=lambda c: c.r)
        model = build_model()
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.base.items()})
        initial = {k: v.detach().numpy().copy()
                   for k, v in peft.get_peft_model_state_dict(peft.get_peft_model(model, widest)).items()}
        return lf.to_array_record(lf.initial_arrays(initial, widest))

    def run(self, rounds, engine="in-process"):
        from lora_agg import flower as lf
        client_app = make_client_app(self.base, self.clients, self.ranks, self.args.local_epochs, self.args.lr)
        if engine == "in-process":
            grid = lf.InProcessGrid(client_app, num_nodes=len(self.ranks))
            self.strategy.start(grid, self.initial_arrays(), num_rounds=rounds, evaluate_fn=self.evaluate)
            return self.rows
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation
        server_app = ServerApp()

        @server_app.main()
        def serve(grid, context):
            self.strategy.start(grid, self.initial_arrays(), num_rounds=rounds, evaluate_fn=self.evaluate)

        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(self.ranks),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"logging_level": logging.ERROR, "log_to_driver": False}})
        return self.rows


def simulate_in_child(args, setting, name):
    """One Flower simulation (Ray) in a fresh Python process; returns its rows.

    A second Ray session in one process, even in a fresh multiprocessing
    child, hung with flwr 1.41 and Ray 2.55 on this machine; a new
    interpreter per run does not.
    """
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--strategies", name,
                   "--settings", setting.split()[0], "--out", folder, "--rows-only"]
        subprocess.run(command, check=True)
        with open(os.path.join(folder, "results.csv")) as handle:
            return [{k: (v if k in ("setting", "strategy") else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(handle)]


def pretrain(args, data):
    import torch
    torch.manual_seed(args.seed)
    model = build_model()
    train(model, *data, epochs=args.pretrain_epochs, lr=1e-2, batch=64, seed=args.seed)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def plot(rows, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = [s for s in ("equal ranks", "heterogeneous ranks") if any(r["setting"] == s for r in rows)]
    names = sorted({r["strategy"] for r in rows})
    colors = {n: plt.get_cmap("tab10" if len(names) <= 10 else "tab20")(i) for i, n in enumerate(names)}
    # Some strategies coincide (zero-pad and replication-pad are FedIT with equal
    # ranks): distinct dashes and markers keep every line visible.
    styles = {n: (["-", "--", ":", "-."][i % 4], "osd^v<>px*"[i % 10]) for i, n in enumerate(names)}
    figure, axes = plt.subplots(len(settings), 3, figsize=(16, 4.6 * len(settings)), squeeze=False)
    columns = [("accuracy", "global model: test accuracy (4 domains)"),
               ("received_accuracy", "what clients receive: accuracy on own domain"),
               ("aggregation_error", "aggregation error ‖ΔW − Σ p_k s_k B_k A_k‖ / ‖·‖")]
    for i, setting in enumerate(settings):
        for j, (metric, title) in enumerate(columns):
            ax = axes[i][j]
            for name in names:
                series = [r for r in rows if r["setting"] == setting and r["strategy"] == name]
                if not series:
                    continue
                xs = [r["round"] for r in series if np.isfinite(r[metric])]
                ys = [r[metric] for r in series if np.isfinite(r[metric])]
                if metric == "aggregation_error":
                    ys = [max(y, 1e-9) for y in ys]
                ax.plot(xs, ys, label=name, color=colors[name], linestyle=styles[name][0], marker=styles[name][1],
                        markersize=3, linewidth=1.4)
            if metric == "aggregation_error":
                ax.set_yscale("log")
            ax.set_title(f"{setting} — {title}", fontsize=10)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8, ncol=2)
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(out / f"strategies.{suffix}", dpi=110)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/federated-digits"), help="output folder")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2, help="clients' Adam learning rate")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="", help="comma-separated names (default: every loaded strategy)")
    parser.add_argument("--settings", default="equal,heterogeneous", help="equal, heterogeneous or both")
    parser.add_argument("--plugin-path", action="append", default=[], help="extra plugin file or folder")
    parser.add_argument("--engine", choices=["in-process", "simulation"], default="in-process",
                        help="in-process: Flower's strategy loop with lora_agg.flower.InProcessGrid; "
                             "simulation: Flower's simulation engine (needs `pip install \"flwr[simulation]\"`, i.e. Ray)")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # one simulation child
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)  # a tiny MLP: threads cost more than they give
    import lora_agg
    import lora_agg.flower  # noqa: F401  (imports flwr, which installs its log handler)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    registry = lora_agg.discover(args.plugin_path)
    wanted = [s for s in args.strategies.split(",") if s] or [n for n in registry.names if not n.startswith("template-")]
    plugins = [registry.plugin(name) for name in wanted]
    args.out.mkdir(parents=True, exist_ok=True)

    pretrain_data, clients, tests = load_data(args.seed)
    base = pretrain(args, pretrain_data)
    print("pretrained on 'original': test accuracy per domain",
          {d: round(accuracy_dense({k: v.astype(np.float64) for k, v in base.items()}, x, y), 3)
           for d, (x, y) in zip(DOMAINS, tests)}, flush=True)

    rows, summary = [], []
    for setting, ranks in (("equal ranks", EQUAL_RANKS), ("heterogeneous ranks", MIXED_RANKS)):
        if setting.split()[0] not in args.settings:
            continue
        for plugin in plugins:
            if len(set(ranks)) > 1 and not plugin.has("heterogeneous-ranks"):
                continue
            started = time.perf_counter()
            if args.engine == "simulation" and not args.rows_only:
                run_rows = [{k: v for k, v in row.items() if k not in ("setting", "strategy")}
                            for row in simulate_in_child(args, setting, plugin.name)]
                for row in run_rows:
                    row["round"] = int(row["round"])
            else:
                run_rows = Federation(args, base, clients, tests, ranks, plugin.name, registry).run(args.rounds, args.engine)
            seconds = time.perf_counter() - started
            for row in run_rows:
                rows.append({"setting": setting, "strategy": plugin.name, **row})
            last = run_rows[-1]
            errors = [r["aggregation_error"] for r in run_rows if np.isfinite(r["aggregation_error"])]
            received_errors = [r["received_error"] for r in run_rows if np.isfinite(r["received_error"])]
            summary.append({"setting": setting, "strategy": plugin.name, "ranks": "/".join(map(str, ranks)),
                            "final_accuracy": last["accuracy"], "best_accuracy": max(r["accuracy"] for r in run_rows),
                            "final_received_accuracy": last["received_accuracy"],
                            "mean_aggregation_error": float(np.mean(errors)),
                            "mean_received_error": float(np.mean(received_errors)), "seconds": seconds})
            print(f"{setting:20s} {plugin.name:16s} acc {last['accuracy']:.3f}  received {last['received_accuracy']:.3f}"
                  f"  agg-error {np.mean(errors):.2e}  ({seconds:.1f} s)", flush=True)

    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.rows_only:
        return 0
    with open(args.out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    lines = [f"# Federated digits: {args.rounds} rounds, 4 clients ({', '.join(DOMAINS)}), seed {args.seed}", "",
             "| setting | strategy | ranks | final acc | best acc | received acc | mean agg. error | mean received error | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['setting']} | {s['strategy']} | {s['ranks']} | {s['final_accuracy']:.3f} | "
                     f"{s['best_accuracy']:.3f} | {s['final_received_accuracy']:.3f} | {s['mean_aggregation_error']:.2e} | "
                     f"{s['mean_received_error']:.2e} | {s['seconds']:.1f} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out)
    print(f"wrote {args.out}/results.csv, summary.md, summary.csv, strategies.png, strategies.svg")


if __name__ == "__main__":
    sys.exit(main())

"""A live Triton server switched from one generation of an export to the next and back, under load.

    python benchmarks/serve_switch.py --old build/upgrade-bench/old --new build/upgrade-bench/upgraded \\
        --concurrency 4 --concurrency 8 --out benchmarks/results/serve_switch

``--old``: a bank export (``export/recipes/demo-bank.yaml``), ``--new``: its upgrade
(``benchmarks/upgrade.py`` makes both: the demo bank on TM-Demo-Target, and upgraded onto
TM-Demo-Large, whose features are wider). For each concurrency: the old export written as a
repository in the ensemble layout, a ``tritonserver`` (the packaged one, Python backend, explicit
model control) serving it, ``C`` clients sending one demo image after another to every task's
image model and the all-task one, then ``transmiter triton NEW --update --server`` (the switch) and
``--rollback``. Reported per switch: failed requests (the target: none), the versions that answered
after it returned, the time until the last answer from the old generation, and p99 latency during
the switch over the second before it (benchmark/switch_load.py). Client and server share the
machine's cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transmiter_deploy.artifacts import atomic_write_text, library_versions, utc_now, write_json
from transmiter_deploy.benchmark.switch_load import ImageLoad, switch_under_load
from transmiter_deploy.host import cpu_model
from transmiter_deploy.serving import triton_server
from transmiter_deploy.serving.deployment import read_export
from transmiter_deploy.serving.triton import write_repository
from transmiter_deploy.serving.triton_generations import rollback

NAME = "bank"


def measure(old: Path, new: Path, clients: int, work: Path) -> dict:
    repository = work / f"repo-{clients}"
    write_repository(old, repository, layout="ensemble", name=NAME)
    tasks = [task.name for task in read_export(old).tasks]
    models = [f"{NAME}_{task}_images" for task in tasks] + [f"{NAME}_images"]
    image = sorted((old / "tasks" / tasks[0] / "data" / "test").rglob("*.png"))[0].read_bytes()  # a demo test image
    server = triton_server.TritonServer([repository], work / f"server-{clients}", explicit=True, models=["*"]).start()
    try:
        with ImageLoad(server.grpc_url, models, image, clients=clients) as load:
            up = switch_under_load(load, lambda: write_repository(new, repository, layout="ensemble", name=NAME,
                                                                  update=True, server=server.grpc_url), "1", 2.0)
            down = switch_under_load(load, lambda: rollback(repository, server.grpc_url, image), "2", 2.0)
            total = len(load.answers)
    finally:
        server.stop()
    return {"clients": clients, "models": models, "requests": total, "switch": up, "rollback": down}


def markdown(record: dict) -> str:
    lines = ["# A live generation switch under load", "",
             f"Made by `{record['command']}` on {record['machine']}, {record['created']}. Old export `{record['old']}` "
             f"(generation 1), new `{record['new']}` (generation 2); packaged tritonserver, Python backend, ensemble "
             "layout, explicit model control; gRPC clients each sending one image after another to every task's image "
             "model and the all-task one.", "",
             "| clients | what | failed requests | answered after by | last old answer after (s) | call (s) "
             "| p99 during (ms) | p99 steady (ms) | p99 ratio | requests during |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in record["rows"]:
        for what in ("switch", "rollback"):
            f = row[what]
            ratio = f["p99_ms"] / f["steady_p99_ms"] if f["p99_ms"] and f["steady_p99_ms"] else None
            lines.append(f"| {row['clients']} | {what} | {len(f['failed'])} | {', '.join(f['versions_after'])} "
                         f"| {f['switch_s']:.1f} | {f['call_s']:.1f} | {f['p99_ms']:.0f} | {f['steady_p99_ms']:.0f} "
                         f"| {ratio:.2f} | {f['requests']} |")
    lines += ["", "Target: no failed request at concurrency 4 and 8; every answer after a switch returned from the "
              "version switched to. The switch time is nearly all the new Python-backend processes starting "
              "(each imports torch) on the cores the clients keep busy."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, action="append")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    reason = triton_server.unavailable()
    if reason:
        raise SystemExit(f"cannot start tritonserver here: {reason}")
    levels = args.concurrency or [4, 8]
    with tempfile.TemporaryDirectory(prefix="serve-switch-") as work:
        rows = [measure(args.old.resolve(), args.new.resolve(), clients, Path(work)) for clients in levels]
    record = {"created": utc_now(), "machine": cpu_model(), "versions": library_versions(),
              "command": "python benchmarks/serve_switch.py --old " + str(args.old) + " --new " + str(args.new)
                         + "".join(f" --concurrency {c}" for c in levels) + f" --out {args.out}",
              "old": str(args.old), "new": str(args.new), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", record)
    atomic_write_text(args.out / "RESULTS.md", markdown(record))
    failed = sum(len(row[what]["failed"]) for row in rows for what in ("switch", "rollback"))
    print(markdown(record))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

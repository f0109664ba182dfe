"""A throwaway agent process for the restart test.

Usage: python -m tests.datapath._agent CGROUP PIN_DIR LOCAL_CLUSTER_ID SPEC_JSON
Loads the datapath, reconciles SPEC_JSON and exits, printing a JSON report.
SPEC_JSON: [{"frontend": [ip, port, proto], "backends": [[ip, port, cluster]], "affinity": "local"}]
"""

from __future__ import annotations

import json
import sys

from clustermesh.datapath import Backend, Frontend, ServiceSpec, SocketLB


def parse(spec_json: str) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            Frontend(*item["frontend"]),
            frozenset(Backend(*b) for b in item["backends"]),
            item.get("affinity", "none"),
        )
        for item in json.loads(spec_json)
    ]


def main(argv: list[str]) -> int:
    cgroup, pin_dir, cluster_id, spec_json = argv
    with SocketLB(cgroup, pin_dir, int(cluster_id)) as lb:
        attachments = lb.load()
        ops = lb.program(parse(spec_json))
        report = {
            "attachments": {a.hook: [a.prog_id, a.action] for a in attachments},
            "ops": [str(op) for op in ops],
            "attached": lb.attached(),
        }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

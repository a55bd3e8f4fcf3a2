"""Reference values from JavaScript itself: ``node`` computes them, not a port.

The seed app is TypeScript on node; where wksd must agree with it byte for
byte (``JSON.stringify``, ``Math.round``), tests ask node.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from .processes import require_binary

#: Seconds node may take for one batch on a loaded CI machine.
NODE_TIMEOUT = 60.0


def run_node(body: str, inputs: Any) -> Any:
    """Run ``body`` in node with ``input`` bound to ``inputs``; what it returns.

    ``inputs`` goes in as JSON on stdin and the value ``body`` returns comes back
    as JSON on stdout, so a batch of thousands of cases costs one process.
    Strings that JSON cannot carry as they are (lone surrogates) can be passed
    as ``\\uXXXX`` escapes: ``json.dumps`` writes them so.
    """
    node = require_binary("node")
    script = (
        "const chunks = [];"
        "process.stdin.on('data', (c) => chunks.push(c));"
        "process.stdin.on('end', () => {"
        "  const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));"
        f"  const output = (() => {{ {body} }})();"
        "  process.stdout.write(JSON.stringify(output));"
        "});"
    )
    done = subprocess.run(
        [node, "-e", script],
        input=json.dumps(inputs).encode(),
        capture_output=True,
        timeout=NODE_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"node failed: {done.stderr.decode(errors='replace')}")
    return json.loads(done.stdout)

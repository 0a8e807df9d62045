"""Turn on one Kueue integration (``integrations.frameworks``) without replacing Kueue's configuration.

Kueue reads its whole configuration from one YAML document inside the ConfigMap
``kueue-system/kueue-manager-config``, so a kustomize patch could only replace that document,
and with it whatever the cluster's installation set. This edits the live document instead:
it adds the framework to ``integrations.frameworks`` (or uncomments it where the release left it
commented out, as Kueue 0.19 does with ``kubeflow.org/pytorchjob``), checks that nothing else
changed, writes the ConfigMap back and restarts Kueue's controller, which reads it at start-up.

    python scripts/kueue_integration.py kubeflow.org/pytorchjob          # enable it
    python scripts/kueue_integration.py --dry-run kubeflow.org/pytorchjob  # print the new document
    python scripts/kueue_integration.py --check trainer.kubeflow.org/trainjob

Needs ``kubectl`` with a context on the cluster and the right to update that ConfigMap and
restart the deployment (a cluster administrator's, once; the launcher never needs it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import yaml

NAMESPACE = "kueue-system"
CONFIG_MAP = "kueue-manager-config"
CONFIG_KEY = "controller_manager_config.yaml"
DEPLOYMENT = "deployment/kueue-controller-manager"


def frameworks(config_text: str) -> list[str]:
    """The integrations Kueue's configuration enables."""
    config = yaml.safe_load(config_text) or {}
    return list((config.get("integrations") or {}).get("frameworks") or [])


def with_framework(config_text: str, framework: str) -> str:
    """Kueue's configuration document with ``framework`` enabled, and every other line unchanged.

    Raises:
        ValueError: The document has no ``integrations.frameworks`` list to extend.
    """
    if framework in frameworks(config_text):
        return config_text
    lines = config_text.splitlines(keepends=True)
    header = next((i for i, line in enumerate(lines) if re.match(r"^\s*frameworks:\s*(#.*)?$", line)), None)
    if header is None or not re.match(r"^integrations:", _previous_key(lines, header)):
        raise ValueError("Kueue's configuration has no integrations.frameworks list to add to")
    items = []
    i = header + 1
    while i < len(lines) and re.match(r"^\s*#?\s*- ", lines[i]):
        items.append(i)
        i += 1
    live = [k for k in items if not lines[k].lstrip().startswith("#")]
    header_indent = re.match(r"^(\s*)", lines[header]).group(1)
    indent = re.match(r"^(\s*)", lines[live[-1]]).group(1) if live else header_indent + "  "
    entry = f'{indent}- "{framework}"\n'
    commented = re.compile(rf"""^\s*#\s*-\s*["']?{re.escape(framework)}["']?\s*(#.*)?$""")
    listed = next((k for k in items if commented.match(lines[k].rstrip("\n"))), None)
    if listed is not None:  # the release lists it commented out: uncomment that very line
        lines[listed] = entry
    else:
        lines.insert((live[-1] if live else header) + 1, entry)
    edited = "".join(lines)
    before, after = yaml.safe_load(config_text), yaml.safe_load(edited)
    after_frameworks = after["integrations"].pop("frameworks")
    before["integrations"].pop("frameworks", None)
    if before != after or sorted(after_frameworks) != sorted([*frameworks(config_text), framework]):
        raise ValueError("editing integrations.frameworks would change more than that list; edit it by hand")
    return edited


def _previous_key(lines: list[str], index: int) -> str:
    """The nearest line above ``index`` that is a top-level key (no indentation, not a comment)."""
    for line in reversed(lines[:index]):
        if line.strip() and not line.startswith((" ", "#", "\t")):
            return line
    return ""


def _kubectl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "framework",
        help="e.g. kubeflow.org/pytorchjob, trainer.kubeflow.org/trainjob, jobset.x-k8s.io/jobset",
    )
    p.add_argument("--check", action="store_true", help="only say whether it is enabled (exit 1 if not)")
    p.add_argument("--dry-run", action="store_true", help="print the edited document, change nothing")
    args = p.parse_args(argv)
    config_map = json.loads(_kubectl("-n", NAMESPACE, "get", "configmap", CONFIG_MAP, "-o", "json"))
    text = config_map["data"][CONFIG_KEY]
    enabled = args.framework in frameworks(text)
    if args.check:
        print(f"{args.framework}: {'enabled' if enabled else 'NOT enabled'} in {NAMESPACE}/{CONFIG_MAP}")
        return 0 if enabled else 1
    if enabled:
        print(f"{args.framework} is already enabled; nothing to do")
        return 0
    try:
        edited = with_framework(text, args.framework)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.dry_run:
        sys.stdout.write(edited)
        return 0
    config_map["data"][CONFIG_KEY] = edited
    _kubectl("replace", "-f", "-", stdin=json.dumps(config_map))  # fails if someone changed it meanwhile
    _kubectl("-n", NAMESPACE, "rollout", "restart", DEPLOYMENT)
    _kubectl("-n", NAMESPACE, "rollout", "status", DEPLOYMENT, "--timeout=300s")
    print(f"enabled {args.framework}; Kueue's controller restarted with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn pip's resolution report into the list of packages the GPU host must be sent (gpu/pack.sh calls this).

`pip install --dry-run --report R.json ROOTS` resolves every dependency of the roots, also those the GPU image already
has. Sent is what the roots need and the image lacks: starting from the roots, follow the requirements of each
package that is sent; a package of the image (gpu/image-packages.txt) is not sent and its own requirements are the
image's business, except the extras a sent package asks of it (`httpx[http2]` sends h2 beside the image's httpx).
Names in --always are sent even though the image has them (its versions may be too old for what is sent).

Prints `name==version` lines, sorted.

Run alone:  python3 gpu/carry_lock.py R.json gpu/image-packages.txt [--always NAME ...] [--exclude NAME ...]
            [--constraints FILE]  (names in FILE, e.g. the main lock, count as sent already and are not printed)
"""
from __future__ import annotations

import argparse
import json
import re
import sys


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report")
    p.add_argument("image_packages")
    p.add_argument("--always", nargs="*", default=[])
    p.add_argument("--exclude", nargs="*", default=[], help="never sent (and not followed)")
    p.add_argument("--constraints", help="a lock whose packages are already sent")
    p.add_argument("--roots", nargs="+", required=True, help="the requirement specs the resolution started from")
    a = p.parse_args()

    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

    image = {norm(line.split("#")[0]) for line in open(a.image_packages) if line.split("#")[0].strip()}
    always, exclude = {norm(n) for n in a.always}, {norm(n) for n in a.exclude}
    already = set()
    if a.constraints:
        already = {norm(line.split("==")[0]) for line in open(a.constraints) if "==" in line}
    installs = {norm(it["metadata"]["name"]): it["metadata"] for it in json.load(open(a.report))["install"]}

    env = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                                   "platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux"}
    sent: set[str] = set()
    todo: list[tuple[str, set[str], bool]] = []  # (name, extras asked, follow its base requirements)

    def visit(spec: str) -> None:
        req = Requirement(spec)
        name = norm(req.name)
        if name in exclude:
            return
        carried = name not in image or name in always
        todo.append((name, set(req.extras), carried))

    for root in a.roots:
        visit(root)
    seen: set[tuple[str, frozenset, bool]] = set()
    while todo:
        name, extras, carried = todo.pop()
        key = (name, frozenset(extras), carried)
        if key in seen:
            continue
        seen.add(key)
        if name not in installs:
            sys.exit(f"carry_lock: {name!r} is needed but missing from the resolution report {a.report}")
        if carried:
            sent.add(name)
        for spec in installs[name].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker is None:
                applies, via_extra = True, False
            else:  # a requirement under `extra == "x"` counts when x was asked of this package
                applies = req.marker.evaluate(env | {"extra": ""})
                via_extra = not applies and any(req.marker.evaluate(env | {"extra": e}) for e in extras)
            if via_extra or (applies and carried):
                visit(spec)

    for name in sorted(sent - already):
        print(f"{name}=={installs[name]['version']}")


if __name__ == "__main__":
    main()

"""Making CPU-only `import torch` work without the NVIDIA wheels.

The PyPI torch wheel is a CUDA build whose libraries link cuDNN, cuBLAS, NCCL, ... even for
CPU work. When those NVIDIA wheels are not installed, `ensure_torch_importable()` builds tiny
stub libraries for them (with gcc, nm, readelf) under .deps/torch-cuda-stubs/ and preloads
them, so CPU-only torch imports without several GB of CUDA downloads. The stubs abort if
anything ever calls into them. Used by the fixture scripts, the benchmark references and the
tests that run torch's own tools (torchrun).
"""

from __future__ import annotations

import collections
import ctypes
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = ROOT / ".deps" / "torch-cuda-stubs"



def _needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\).*\[(.*)\]", out)


def _dyn_syms(path: str, undefined: bool) -> list[tuple[str, str, str]]:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True, check=True).stdout
    res = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        typ, sym = parts[-2], parts[-1]
        name, _, ver = sym.partition("@")
        res.append((typ, name, ver.lstrip("@")))
    return res


def ensure_torch_importable() -> None:
    """Preload stub libraries for CUDA libraries the torch wheel links but that are absent."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torch is not installed in this interpreter")
    torch_dir = Path(list(spec.submodule_search_locations)[0])
    site = torch_dir.parent
    c_ext = glob.glob(str(torch_dir / "_C.*.so"))
    if not c_ext or sys.platform != "linux":
        return
    search = [str(torch_dir / "lib")] + sorted(glob.glob(str(site / "nvidia" / "*" / "lib")))
    sysdirs = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]

    def find(so: str) -> str | None:
        for d in search + sysdirs:
            p = os.path.join(d, so)
            if os.path.exists(p):
                return p
        return None

    seen: dict[str, str] = {}
    missing: set[str] = set()
    todo = [c_ext[0]]
    while todo:
        f = todo.pop()
        for so in _needed(f):
            if so in seen or so in missing:
                continue
            p = find(so)
            if p is None:
                missing.add(so)
            else:
                seen[so] = p
                todo.append(p)
    if not missing:
        return  # the real NVIDIA wheels are installed

    stamp = STUB_DIR / "stamp.json"
    key = {"torch_c": os.path.realpath(c_ext[0]), "mtime": os.path.getmtime(c_ext[0]), "missing": sorted(missing)}
    if not (stamp.exists() and json.loads(stamp.read_text()) == key):
        print(f"[stubs] building CUDA stub libraries for {sorted(missing)} in {STUB_DIR}", file=sys.stderr)
        defined = set()
        for p in seen.values():
            defined.update(n for _, n, _ in _dyn_syms(os.path.realpath(p), False))
        need: dict[str, str] = {}
        for p in [c_ext[0]] + list(seen.values()):
            for typ, name, ver in _dyn_syms(p, True):
                if typ != "U" or name in defined or re.match(r"_?Py", name):
                    continue  # weak refs need nothing; Py* comes from the interpreter
                need.setdefault(name, ver)
        prefix_lib = [("cusparseLt", "libcusparseLt.so.0"), ("cuFile", "libcufile.so.0"),
                      ("curand", "libcurand.so.10"), ("nccl", "libnccl.so.2")]
        ver_lib = {"NVSHMEM": "libnvshmem_host.so.3"}
        fallback = sorted(missing)[0]
        per_lib: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for name, ver in need.items():
            if ver:
                so = ver_lib.get(ver, ver)
            else:
                so = next((s for p, s in prefix_lib if name.startswith(p) and s in missing), fallback)
            if so not in missing:
                so = fallback
            per_lib[so].append((name, ver))
        if STUB_DIR.exists():
            shutil.rmtree(STUB_DIR)
        STUB_DIR.mkdir(parents=True)
        for so in sorted(missing):
            syms = sorted(per_lib.get(so, []))
            src = [
                "#include <stdio.h>",
                "#include <stdlib.h>",
                'static void stub_fail(const char *n) { fprintf(stderr, "hicra CUDA stub: %s called '
                '(NVIDIA libraries not installed)\\n", n); abort(); }',
            ]
            src += [f'int {n}(void) {{ stub_fail("{n}"); return 1; }}' for n, _ in syms]
            (STUB_DIR / f"{so}.c").write_text("\n".join(src) + "\n")
            cmd = ["gcc", "-shared", "-fPIC", "-O0", "-o", str(STUB_DIR / so), str(STUB_DIR / f"{so}.c"),
                   f"-Wl,-soname,{so}"]
            versions = sorted({v for _, v in syms if v})
            if versions:
                body = " ".join(f"{v} {{ global: *; }};" for v in versions)
                (STUB_DIR / f"{so}.map").write_text(body + "\n")
                cmd.append(f"-Wl,--version-script={STUB_DIR / f'{so}.map'}")
            subprocess.run(cmd, check=True)
        stamp.write_text(json.dumps(key))
    for so in sorted(missing):
        ctypes.CDLL(str(STUB_DIR / so), mode=ctypes.RTLD_GLOBAL)

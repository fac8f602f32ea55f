"""Build the C++ CPU kernels: `python -m workers.kernels.build` (run by `make install`).

Needs a C++ compiler and ninja; without them it says so and exits 0: the engine then runs its
pure-torch paths (same results, slower).
"""

from __future__ import annotations

import shutil
import sys

from workers.kernels import NAME, SOURCES, build_dir


def main() -> int:
    out = build_dir(pinned=False)  # never into an older build named by MOE_KERNELS_BUILD
    if any(out.glob(f"{NAME}*.so")):
        print(f"kernels: up to date ({out})")
        return 0
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        print(f"kernels: not built ({', '.join(missing)} not found); using the torch paths")
        return 0
    from torch.utils.cpp_extension import load

    out.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name=NAME,
            sources=[str(p) for p in SOURCES if p.suffix == ".cpp"],
            build_directory=str(out),
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a broken toolchain must not break the install
        print(f"kernels: build failed ({type(e).__name__}: {e}); using the torch paths")
        shutil.rmtree(out, ignore_errors=True)
        return 0
    print(f"kernels: built into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

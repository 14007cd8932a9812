#!/usr/bin/env bash
# Builds the pip wheel of the `ckmerge` binary into dist/ (maturin, `bin` bindings; see
# pyproject.toml): manylinux2014, linked by zig against glibc 2.17 so it runs on the
# glibc of common cluster images, with the man pages (coordinator/wheel-data, installed into
# the environment's share/man/man1). Nothing of CUDA is linked:
# the kernels are compiled at run time, as with a cargo build.
#   CKMERGE_WHEEL_VENV  where maturin and zig are installed (default
#                       ~/.cache/ckmerge/wheel-venv; outside the repository)
# Prints the wheel's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CKMERGE_WHEEL_VENV:-$HOME/.cache/ckmerge/wheel-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/maturin" ] || ! "$venv/bin/python" -c "import ziglang" 2>/dev/null; then
  "$venv/bin/pip" install --quiet "maturin>=1.7,<2" ziglang
fi

rm -f dist/ckmerge-*.whl
PATH="$venv/bin:$PATH" maturin build --release --zig --compatibility manylinux2014 --out dist >&2
ls dist/ckmerge-*.whl

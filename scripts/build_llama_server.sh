#!/usr/bin/env bash
# Build llama.cpp's HTTP server (what a llamafile embeds) from the llama.cpp source that
# ships inside the llama-cpp-python sdist. Cached: a second run only prints the path.
# Usage: scripts/build_llama_server.sh [PYTHON]   -> prints the path of llama-server
set -euo pipefail
PY=${1:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${LOCALLLMS_CACHE:-$HOME/.cache/langchain-localllms}
SRC=$CACHE/src/llama_cpp_python-$VERSION
BUILD=$CACHE/llama-server-$VERSION
BIN=$BUILD/bin/llama-server
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
mkdir -p "$CACHE/src"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  echo "[llama-server] fetching the llama-cpp-python $VERSION sdist" >&2
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/src" >&2
  tar xzf "$CACHE/src/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src"
fi
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
echo "[llama-server] building from $SRC/vendor/llama.cpp (about 6 min on 2 cores)" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD.tmp" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF \
  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD.tmp" --target llama-server -j "$(nproc)" >&2
rm -rf "$BUILD"; mv "$BUILD.tmp" "$BUILD"
echo "$BIN"

# Two commands for a fresh machine:  `make demo` (set up, export the default model for android-arm64)
# and `make test` (set up, run the test suite). torch 2.13.0 (CPU) is installed before anything else so that no
# CUDA build is pulled in.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TARGET  ?= android-arm64

.PHONY: setup system-deps demo test test-slow test-arm64 bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[all,dev]'
	touch $@

system-deps:
	@command -v aarch64-linux-gnu-gcc >/dev/null || { \
	  echo "installing Debian's gcc-aarch64-linux-gnu (links aarch64 TVM libraries)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq gcc-aarch64-linux-gnu; }
	@command -v debootstrap >/dev/null || { \
	  echo "installing Debian's debootstrap (builds the emulated ARM64 device: afedge device setup emu-arm64)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq debootstrap; }
	@command -v kotlinc >/dev/null || { \
	  echo "installing Debian's kotlin (kotlinc 1.3; builds and tests examples/android's pure-Kotlin core)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq kotlin; }

setup: $(STAMP) system-deps

demo: setup
	$(BIN)/afedge export --target $(TARGET) --out out/$(TARGET)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-arm64: setup   # the emulated ARM64 devices (builds them on first use), part of test-slow
	$(BIN)/afedge device setup emu-arm64
	$(BIN)/python -m pytest -q -m slow tests/device

clean:
	rm -rf $(VENV) out build *.egg-info

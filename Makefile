# make quickstart: install into .venv, pretrain a tiny LLaMA on manual pages, fine-tune it, generate, evaluate the
#                  adapter against its base; offline, CPU.
# make test:       install the same way, then lint (ruff check, ruff format --check) and run the test suite (what CI runs).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Without a GPU, torch goes in first as the CPU build, so the package's `torch>=2.4` needs nothing more.
# Elsewhere add the CPU index: make quickstart TORCH_INDEX='--index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# accelerate launch gives a CPU process one thread unless told otherwise: half this 2-core machine's speed.
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(shell nproc)

.PHONY: install corpora quickstart study test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "$(TORCH)" $(TORCH_INDEX); fi
	$(BIN)/pip install -q -e '.[dev,eval,ja]'
	touch $@

install: $(VENV)/.installed

# The offline pretraining corpus: English and Japanese manual pages, read where Debian's packages install them.
# Checked by package, not by folder: apt, dpkg and vim put a few Japanese pages in /usr/share/man/ja themselves.
CORPUS_PACKAGES := manpages manpages-ja groff-base
corpora:
	@if ! command -v dpkg-query >/dev/null; then \
		echo "not a Debian system: install $(CORPUS_PACKAGES) (or their equivalents) for the pretraining corpus"; exit 0; fi; \
	missing=$$(for p in $(CORPUS_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing" $$missing "(the pretraining corpus)"; \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; } \
		|| echo "could not install" $$missing": pretraining will warn that its corpus is small"; fi

quickstart: install corpora
	$(LAUNCH) finetune/pretrain.py recipe=pretrain-tiny resume=true
	$(LAUNCH) finetune/sft.py recipe=quickstart resume=true
	$(BIN)/python -m finetune.generate outputs/quickstart --sample --max-new-tokens 48 \
		"日本で一番高い山は何ですか？" "Give three tips for staying healthy."
	$(BIN)/python eval/evaluate.py recipe=eval-quickstart

# The study (finetune/study.py): does a large fine-tuning set make continued pretraining unnecessary? ~30 minutes.
study: install corpora
	$(BIN)/python finetune/study.py recipe=study-quickstart

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: install corpora
	$(BIN)/python bench/sft_throughput.py
	$(BIN)/python bench/pretrain_throughput.py

clean:
	rm -rf outputs .pytest_cache

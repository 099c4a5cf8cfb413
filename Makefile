# Set-up and everyday commands. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
CONFIG ?= appliance.toml
# make engine MODEL=models/<name> PRECISION=int8|fp16|fp32 (defaults: the config's model, auto)
MODEL ?=
PRECISION ?= auto
TARGET ?=
REPO ?=
STAMP := $(VENV)/.installed

.PHONY: venv protos model engine bench fuzz gpu-check certs run check test lint typecheck contracts check-protos dicom-tools triton-peer clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Generated gRPC code lives beside the package (appliance/v1/: the appliance's API; appliance/kserve/: the
# inference protocol the remote backend speaks to Triton); CI checks it is fresh.
protos: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --mypy_out=. \
		protos/appliance/v1/*.proto protos/appliance/kserve/*.proto

check-protos: protos
	git diff --exit-code -- appliance/v1 appliance/kserve || \
		(echo "appliance/v1 or appliance/kserve is stale: run 'make protos' and commit." && exit 1)
	test -z "$$(git status --porcelain -- appliance/v1 appliance/kserve)" || \
		(echo "appliance/v1 or appliance/kserve has files git does not track: run 'make protos' and commit." && exit 1)

# Fetch the bundled default model (checks hashes; idempotent). The pipeline-test model.onnx is
# committed; retraining it is a manual step (models/pipeline-test/MODEL_CARD.md).
model: $(STAMP)
	$(PY) models/brain-mri-vgg16/fetch.py
	$(PY) models/brain-mri-vgg16/image_sets.py
	$(PY) models/brain-mri-vgg16/brain_slices.py
	$(PY) models/pipeline-test/synth.py

# The fastest artifact this host runs, behind the accuracy gate: engines/<model>/ (python -m build_engine --help).
# make engine TARGET=triton REPO=dir: a Triton model repository of the gated artifact, for a server past this box.
engine: model
	$(PY) -m build_engine --config $(CONFIG) $(if $(MODEL),--model $(MODEL)) --precision $(PRECISION) \
		$(if $(TARGET),--target $(TARGET)) $(if $(REPO),--repo $(REPO))

# Throughput and latency, measured in one run: the MR workload on the configured model, then full-size
# radiographs on the small pipeline-test model, through the folder and then pushed by DCMTK's storescu to the
# DICOM receiver, without and with a PACS; then a 300-slice CT series by storescu with a real Orthanc as the
# PACS, reported per series against per image; then one, two and four appliances sending inference to one real
# Triton beside the local backend (make bench WORKLOAD=mr|radiograph|series|triton MODEL=... COUNT=...).
# WORKLOAD=build: an MR burst while the daemon builds its artifact in the background (not in the default list:
# the default model's build takes minutes). PROFILE=1: for mr and radiograph, where the daemon's CPU goes during
# the burst, by thread and function (py-spy).
WORKLOAD ?= mr radiograph series triton
bench: model
	for w in $(WORKLOAD); do $(PY) -m bench --config $(CONFIG) --workload $$w \
		$(if $(MODEL),--model $(MODEL)) $(if $(COUNT),--count $(COUNT)) $(if $(PROFILE),--profile) || exit 1; done

# Mutated DICOM/PNG/JPEG/TIFF inputs through decode + preprocess, each in a worker with memory and time limits;
# prints outcomes by code and saves each finding to tests/fuzz/regressions/ (make fuzz CASES=N SEED=S JOBS=J).
CASES ?= 2000
SEED ?= 0
fuzz: model
	$(PY) -m tests.fuzz.campaign --cases $(CASES) --seed $(SEED) $(if $(JOBS),--jobs $(JOBS))

# On a box with an NVIDIA GPU: the gpu tests, TensorRT builds of both models and the bench on TensorRT,
# each step guarded (skipped with the reason where TensorRT or the GPU is missing), then one report table.
gpu-check: model
	$(PY) -m build_engine.gpu_check --config $(CONFIG)

# TLS for the clinic's network: `make certs` makes the private CA (first time) and this box's server
# certificate; `make certs TERMINAL=name` a terminal's certificate. Keep $(CERTS)/ca/ off the box.
CERTS ?= certs
certs: $(STAMP)
	$(PY) -m appliance.api.certs --out $(CERTS) $(if $(TERMINAL),--terminal $(TERMINAL))

run: model
	mkdir -p var/incoming
	$(BIN)/appliance run --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check appliance build_engine bench tests models
	$(BIN)/ruff format --check appliance build_engine bench tests models

typecheck: $(STAMP)
	$(BIN)/mypy

# The layers of appliance/ (pyproject.toml's [tool.importlinter]): each imports only those below it.
contracts: $(STAMP)
	$(BIN)/lint-imports

# The DICOM peers the tests talk to (Orthanc, DCMTK, dicom3tools): installed with apt where this runs as root
# and they are missing; elsewhere their tests are skipped, each with the line that installs them.
dicom-tools:
	sh tests/peers/install.sh

# The Triton Inference Server the remote backend's tests and bench talk to: nvidia-pytriton's wheel bundles the
# tritonserver binary with its python backend only; its own virtualenv (numpy < 2). Where it cannot be built
# (no package index), its tests are skipped, each with the line to run.
TRITON_VENV ?= .venv-triton
triton-peer:
	sh tests/peers/install_triton.sh $(TRITON_VENV)

# Before a commit, under 3 minutes on 2 cores: lint, types, the layer contracts and every test not marked slow
# (the running daemon, builds, waits on a worker's time limit: `make test`, as CI, runs those too).
check: lint typecheck contracts
	$(BIN)/pytest -q -m "not slow"

# Everything, in a worker per core (a test file stays in one worker: its module fixtures are built once): most
# of the suite waits on real daemons and peers, and on an AVX2-only 2-core box it took 23 minutes in one.
test: model lint typecheck contracts dicom-tools triton-peer
	$(BIN)/pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

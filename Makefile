# The two commands of the README: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a CPU build from local disk. Unpinned, it pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the default person segmenter's model file, once (never at run time): see daskmv/models.py
	$(PY) -m daskmv.models fetch
	touch $(STAMP)

demo: $(STAMP)
	$(PY) manifests/make_sample.py manifests/sample
	$(VENV)/bin/daskmv run manifests/sample/manifest.csv --pipeline manifests/demo_pipeline.yaml \
		--out demo-out --workers 2 --overwrite
	$(VENV)/bin/daskmv status demo-out
	# the relight pipeline on the real photos of people, with plain PNG files and a contact sheet
	$(VENV)/bin/daskmv run manifests/sample/people.csv --pipeline relight --out demo-relight --workers 2 \
		--export png --overwrite
	$(VENV)/bin/daskmv preview demo-relight
	# structure from motion on a rendered room (12 views, known cameras, metric depth): a COLMAP model
	$(PY) -m daskmv.sfm.synthetic manifests/sample/room --depth
	$(VENV)/bin/daskmv run manifests/sample/room/photos.csv --pipeline manifests/sfm_pipeline.yaml \
		--out demo-sfm --workers 2 --overwrite
	$(VENV)/bin/daskmv status demo-sfm
	# videos: three generated clips (their pixels encode each frame's index) and a broken file, into frames
	$(PY) -m daskmv.video.synthetic manifests/sample/video --videos 3 --frames 150 --size 320x240 --broken
	$(VENV)/bin/daskmv run manifests/sample/video/videos.csv --pipeline manifests/frames_pipeline.yaml \
		--out demo-frames --workers 2 --overwrite --max-error-rate 1
	$(VENV)/bin/daskmv status demo-frames --errors

# pytest exits 5 when it collects nothing; any non-zero status fails the target.
test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) demo-out demo-relight demo-sfm demo-frames manifests/sample benchmarks/work

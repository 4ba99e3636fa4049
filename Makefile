# `make venv` builds .venv with pinned packages (idempotent: re-runs only when requirements or setup.py change).
# `make test` runs the whole suite (installing chromium for the browser test when missing); `make demo` runs the main
# job on the embedded default (the shapes-world model shipped in data/shapes-model). `make shapes-model` retrains that
# model from scratch with the staged recipe (data seed 0, training seed 0) and `make shapes-bench` measures it on a held-out world (seed 1).
PY := .venv/bin/python
STAMP := .venv/.installed

SHAPES := data/shapes
MODEL := data/shapes-model
BENCH := $(PY) -m vllm2.cli bench
BENCH_OUT := runs/shapes-bench
STAGED := runs/shapes
STAGE0 := $(PY) -m vllm2.cli tower pretrain --config configs/shapes/base.yaml --data $(SHAPES)/train/instances.json \
	--held-out $(SHAPES)/val/instances.json --limit 4000 --steps 2000 --out $(STAGED)/stage0

TEXT_MODEL := $(STAGED)/text/final
COMPARE_OUT := runs/shapes-compare

.PHONY: venv browser test demo shapes-model shapes-bench shapes-text-model shapes-compare clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv .venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Headless Chromium for the browser test of the web demo (Debian's package; playwright never downloads one).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: venv browser
	$(PY) -m pytest -q tests

# One prompt per task (describe, count, detect, segment, find, pose, draw, edit), answered in one batch.
demo: venv
	$(PY) -m vllm2.cli chat --model $(MODEL) --batch data/samples/demo.json --out demo_out

# The training world (seed 0) and the held-out world (seed 1); 32-pixel text-to-image and edit images.
$(SHAPES)/train/manifest.json: $(STAMP)
	$(PY) -m vllm2.cli data shapes --out $(SHAPES)/train --n 12000 --seed 0 --gen-size 32

$(SHAPES)/val/manifest.json: $(STAMP)
	$(PY) -m vllm2.cli data shapes --out $(SHAPES)/val --n 200 --seed 1 --gen-size 32

# The real recipe in miniature, from scratch. Stage 0 makes what real users download: the vision tower (patch-phrase
# contrast) and the generation and edit UNets (`vllm2 decoder pretrain`, trained on caption embeddings as SD and
# InstructPix2Pix were; the edit UNet in two cosine cycles, 2000 steps then 1000 at a lower rate); the tower,
# configs/shapes/stage1.yaml, stage1b.yaml (stage 1 continued) and the generation UNet run on one core while the edit
# UNet trains on the other. Then stage2.yaml (every task; the UNets join pretrained and frozen) as two data-parallel
# single-thread processes of 12 samples each (`--nproc 2`, gloo: 1.3x the steps per second of one process with two
# threads, docs/shapes-experiments.md), and stage 3, decoders only, from stage 2's export on two cores: stage3a.yaml
# (GroundingDINO's tasks), stage3a2.yaml (GroundingDINO alone, a second cycle), then stage3c.yaml and stage3d.yaml
# (keypoints against 3a's frozen GroundingDINO and [DET] table, in two cosine cycles) on one; stage3b.yaml (the edit
# UNet) then, once 3a2 is done, stage3a3.yaml (GroundingDINO's third cycle) and stage3e.yaml (the generation link and
# UNet) on the other. Three `vllm2 export --merge` calls join them: 3a3 into 3d's run (both go back to 3a), then 3b and
# 3e (both began at stage 2). Per-stage seconds in $(STAGED)/times.txt. The joined model becomes $(MODEL).
TRAIN := $(PY) -m vllm2.cli train
UNET0 := $(PY) -m vllm2.cli decoder pretrain --config configs/shapes/base.yaml -q
TIMED = timed() { local name=$$1 t0=$$(date +%s); shift; "$$@" || return 1; \
	echo "$$name: $$(( $$(date +%s) - t0 )) s" | tee -a $(STAGED)/times.txt; }

shapes-model: $(SHAPES)/train/manifest.json $(SHAPES)/val/manifest.json
	mkdir -p $(STAGED) && rm -f $(STAGED)/times.txt
	$(TIMED); export OMP_NUM_THREADS=1; start=$$(date +%s); \
	( timed "stage 0 (tower)" $(STAGE0) && timed "stage 1" $(TRAIN) configs/shapes/stage1.yaml && \
	  timed "stage 1b" $(TRAIN) configs/shapes/stage1b.yaml && \
	  timed "stage 0 (sd)" $(UNET0) --decoder sd --steps 1200 --out $(STAGED)/sd ) & a=$$!; \
	( timed "stage 0 (ip2p)" $(UNET0) --decoder ip2p --steps 2000 --out $(STAGED)/ip2p-2000 && \
	  timed "stage 0 (ip2p, second cycle)" $(UNET0) decoders.ip2p.pretrained_path=$(STAGED)/ip2p-2000 \
		--decoder ip2p --steps 1000 --lr 1e-3 --out $(STAGED)/ip2p ) & b=$$!; \
	wait $$a; a=$$?; wait $$b; b=$$?; [ $$a = 0 ] && [ $$b = 0 ] || exit 1; \
	echo "stages 0-1b, two cores: $$(( $$(date +%s) - start )) s" | tee -a $(STAGED)/times.txt
	$(TIMED); export OMP_NUM_THREADS=1; \
	timed "stage 2" $(TRAIN) --nproc 2 configs/shapes/stage2.yaml training.per_device_batch_size=12
	$(TIMED); export OMP_NUM_THREADS=1; start=$$(date +%s); rm -f $(STAGED)/stage3a2.done; \
	( timed "stage 3a" $(TRAIN) configs/shapes/stage3a.yaml && \
	  timed "stage 3a2" $(TRAIN) configs/shapes/stage3a2.yaml && touch $(STAGED)/stage3a2.done && \
	  timed "stage 3c" $(TRAIN) configs/shapes/stage3c.yaml && \
	  timed "stage 3d" $(TRAIN) configs/shapes/stage3d.yaml ) & a=$$!; \
	( timed "stage 3b" $(TRAIN) configs/shapes/stage3b.yaml && \
	  until [ -e $(STAGED)/stage3a2.done ]; do kill -0 $$a 2>/dev/null || exit 1; sleep 10; done && \
	  timed "stage 3a3" $(TRAIN) configs/shapes/stage3a3.yaml && \
	  timed "stage 3e" $(TRAIN) configs/shapes/stage3e.yaml ) & b=$$!; \
	wait $$a; a=$$?; wait $$b; b=$$?; [ $$a = 0 ] && [ $$b = 0 ] || exit 1; \
	echo "stages 3a, 3a2, 3c, 3d beside 3b, 3a3, 3e, two cores: $$(( $$(date +%s) - start )) s" | tee -a $(STAGED)/times.txt
	rm -rf $(STAGED)/stage3-gdino $(STAGED)/stage3-edit $(STAGED)/stage3 $(MODEL) && mkdir -p $(MODEL)
	$(PY) -m vllm2.cli export --model $(STAGED)/stage3d/final --base $(STAGED)/stage3a/final \
		--merge $(STAGED)/stage3a3/final --out $(STAGED)/stage3-gdino
	$(PY) -m vllm2.cli export --model $(STAGED)/stage3-gdino --base $(STAGED)/stage2/final \
		--merge $(STAGED)/stage3b/final --out $(STAGED)/stage3-edit
	$(PY) -m vllm2.cli export --model $(STAGED)/stage3-edit --base $(STAGED)/stage2/final \
		--merge $(STAGED)/stage3e/final --out $(STAGED)/stage3
	cd $(STAGED)/stage3 && cp config.json model.safetensors processor_config.json tokenizer.json \
		tokenizer_config.json $(CURDIR)/$(MODEL)/

# Routed mode (the model picks its routes) on the held-out world; one result JSON per task in $(BENCH_OUT).
shapes-bench: $(SHAPES)/val/manifest.json
	mkdir -p $(BENCH_OUT)
	$(BENCH) det --model $(MODEL) --data $(SHAPES)/val/instances.json --batch-size 16 --out $(BENCH_OUT)/det.json
	$(BENCH) seg --model $(MODEL) --data $(SHAPES)/val/instances.json --batch-size 16 --out $(BENCH_OUT)/seg.json
	$(BENCH) semseg --model $(MODEL) --data $(SHAPES)/val/semseg --batch-size 16 --out $(BENCH_OUT)/semseg.json
	$(BENCH) rec --model $(MODEL) --data $(SHAPES)/val/refcoco.jsonl --batch-size 16 --out $(BENCH_OUT)/rec.json
	$(BENCH) res --model $(MODEL) --data $(SHAPES)/val/refcoco.jsonl --batch-size 16 --out $(BENCH_OUT)/res.json
	$(BENCH) pose --model $(MODEL) --data $(SHAPES)/val/keypoints.json --pck-alpha 0.1 --batch-size 16 \
		--out $(BENCH_OUT)/pose.json
	$(BENCH) vqa --model $(MODEL) --data $(SHAPES)/val/vqa_bench.jsonl --batch-size 16 --out $(BENCH_OUT)/vqa.json
	$(BENCH) caption --model $(MODEL) --data $(SHAPES)/val/captions_bench.jsonl --batch-size 16 \
		--out $(BENCH_OUT)/caption.json
	$(BENCH) gen --model $(MODEL) --data $(SHAPES)/val/t2i.jsonl --judge shapes --batch-size 16 --out $(BENCH_OUT)/gen.json
	$(BENCH) edit --model $(MODEL) --data $(SHAPES)/val/edit.jsonl --judge shapes --batch-size 16 \
		--out $(BENCH_OUT)/edit.json

# The text-transmission baseline on the staged recipe (configs/shapes/text.yaml: from the super-link model's stage 1b
# export, so after `make shapes-model`; as many steps as its decoders get after stage 1) -> $(TEXT_MODEL).
shapes-text-model: $(SHAPES)/train/manifest.json
	$(PY) -m vllm2.cli train configs/shapes/text.yaml

# Super link against text transmission on the held-out world: det, rec and pose of both models (routed), then tokens
# decoded and seconds per image side by side (benchmarks/transmission.py).
shapes-compare: $(SHAPES)/val/manifest.json
	mkdir -p $(COMPARE_OUT)
	for kind in superlink text; do \
		model=$$( [ $$kind = text ] && echo $(TEXT_MODEL) || echo $(MODEL) ); \
		$(BENCH) det --model $$model --data $(SHAPES)/val/instances.json --batch-size 16 --out $(COMPARE_OUT)/$$kind-det.json; \
		$(BENCH) rec --model $$model --data $(SHAPES)/val/refcoco.jsonl --batch-size 16 --out $(COMPARE_OUT)/$$kind-rec.json; \
		$(BENCH) pose --model $$model --data $(SHAPES)/val/keypoints.json --pck-alpha 0.1 --batch-size 16 \
			--out $(COMPARE_OUT)/$$kind-pose.json; \
	done
	$(PY) benchmarks/transmission.py --superlink $(MODEL) --text $(TEXT_MODEL) --data $(SHAPES)/val \
		| tee $(COMPARE_OUT)/transmission.json

clean:
	rm -rf .venv

#!/bin/bash
# ResNet-18 finals of the study on the GPU (how benchmarks/results/study-gpu.* were made): 8 processes
# (dataset x arm), seeds 0-4, with the choices frozen by the CPU tuning. Run on the device machine from the
# repository root with the zarr wheels in .whl/ and the two MedMNIST files in .gpu/data/ carried:
#   BUDGET=370 bash benchmarks/gpu_study.sh   (writes $OUT/gpu-study.tgz)
# ARMS picks the arms (one process per dataset x arm), e.g. ARMS=nil-gradient for the arm added last
# (its rows then go beside the others in study-gpu-runs.jsonl by hand: the committed GPU rows' keys
# were computed by an older revision and are not recomputed here).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, torchvision, sklearn, zarr; print(torch.__version__, torchvision.__version__, zarr.__version__, torch.cuda.is_available())" | tee -a $OUT/gpu.txt
R=/tmp/res; mkdir -p $R; cp benchmarks/results/study-choice.json $R/study-choice.json
common="bench study final --models resnet18 --seeds 0,1,2,3,4 --device cuda --data-dir .gpu/data --workdir /tmp/runs --out $R/study-gpu.json --threads 2"
start=$(date +%s)
for ds in retinamnist breastmnist; do for arm in ${ARMS:-ce ce-matched nil-fresh nil-stored nil-gradient}; do
  timeout "${BUDGET:-420}" python3 -m cli $common --datasets $ds --arms $arm > $R/log-$ds-$arm.txt 2>&1 &
done; done
wait
echo "finals took $(( $(date +%s) - start )) s"
python3 -m cli bench study report --models resnet18 --seeds 0,1,2,3,4 --device cuda \
  --data-dir .gpu/data --workdir /tmp/runs --out $R/study-gpu.json > $R/report.txt 2>&1
cp $OUT/gpu.txt $R/; tar czf $OUT/gpu-study.tgz -C $R .
wc -l $R/study-runs.jsonl; tail -qn 1 $R/log-*.txt

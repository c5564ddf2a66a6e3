#!/bin/bash
# The trained-embedding row of benchmarks/results/stream.json (issue 15): synth a 1.43M-patch store and a
# 100k one, train a small CNN 2 epochs on the small one, embed the big one, stream 1M of its embeddings.
# Each step is skipped when its output exists. Usage: bash benchmarks/trained_stream.sh [WORKDIR=/tmp/tr]
set -e
W=${1:-/tmp/tr}
N=${NIL:-nil}
[ -d $W/store.zarr ] || $N data synth $W/store.zarr --n 1430000 --size 32 --classes 9 --seed 0 --no-progress 2>/dev/null || $N data synth $W/store.zarr --n 1430000 --size 32 --classes 9 --seed 0
[ -d $W/small.zarr ] || $N data synth $W/small.zarr --n 100000 --size 32 --classes 9 --seed 1
[ -f $W/run/best.pt ] || $N train --data $W/small.zarr --model small_cnn --epochs 2 --batch-size 256 --loss nil --ann exact --out $W/run --device cpu --no-progress --log none
[ -f $W/index/manifest.json ] || $N index build --checkpoint $W/run/best.pt --data $W/store.zarr --split train --index exact --out $W/index --device cpu --no-progress
$N bench stream --n 1000000 --data trained:$W/index --kind auto --refresh-every 200 --cycles 2.0 --exact-every 2 --batch 256 --classes 9 --seed 0 --out benchmarks/results/stream.json --no-progress
# the same embeddings at the fixed default nprobe (no calibration), for comparison; then with 32 PQ sub-quantizers
$N bench stream --n 1000000 --data trained:$W/index --kind auto --param probe_recall=0 --refresh-every 200 --cycles 2.0 --exact-every 2 --batch 256 --classes 9 --seed 0 --out benchmarks/results/stream.json --no-progress
$N bench stream --n 1000000 --data trained:$W/index --kind auto --param m=32 --refresh-every 200 --cycles 2.0 --exact-every 2 --batch 256 --classes 9 --seed 0 --out benchmarks/results/stream.json --no-progress
echo DONE

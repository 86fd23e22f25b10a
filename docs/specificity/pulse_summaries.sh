#!/usr/bin/env bash
# The three-seed PULSE summaries of docs/specificity/README.md (tables .md, numbers .json,
# plots .png) from the run folders in docs/specificity/pulse/. Run from the repository root.
set -euo pipefail
D=docs/specificity/pulse
W0="ridge=0.01, protect_weight=0"          # the keyed edit's first settings
R0="ridge=0.001, protect_weight=0"
DEF="default, ridge=0.001, protect_weight=100"

args=()
for s in 0 1 2; do
  args+=("$D/relation-r5-s$s" "$D/relation-r5-siu-ofmu-s$s" "$D/relation-r5-keyed-w0-s$s=$W0"
         "$D/relation-r5-keyed-ridge1e-3-w0-s$s=$R0" "$D/relation-r5-keyed-s$s=$DEF")
done
args+=("$D/relation-r5-mollm-lr5e-6-s1" "$D/relation-r5-mollm-lr5e-6-s2")
python docs/pulse_seeds.py "${args[@]}" --out "$D/relation-r5" \
  --title "PULSE, five requests focused on a relation (pre-trained), three seeds"

args=()
for s in 0 1 2; do
  args+=("$D/subject-ft-r5-s$s" "$D/subject-ft-keyed-w0-s$s=$W0" "$D/subject-ft-keyed-s$s=$DEF")
done
for d in "$D"/subject-ft-siu-s? "$D"/subject-ft-ofmu-s?; do args+=("$d"); done
python docs/pulse_seeds.py "${args[@]}" --out "$D/subject-ft-r5" \
  --title "PULSE, five requests focused on an invented person (fine-tuned), three seeds"

args=("$D/spread-r5-s0")
for s in 1 2; do args+=("$D/spread-pt-r5-s$s" "$D/spread-ft-r5-s$s"); done
for s in 0 1 2; do
  args+=("$D/spread-pt-siu-s$s" "$D/spread-ft-siu-s$s"
         "$D/spread-pt-keyed-w0-s$s=$W0" "$D/spread-pt-keyed-ridge1e-3-w0-s$s=$R0"
         "$D/spread-ft-keyed-w0-s$s=$W0" "$D/spread-pt-keyed-s$s=$DEF" "$D/spread-ft-keyed-s$s=$DEF")
done
python docs/pulse_seeds.py "${args[@]}" --out "$D/spread-r5" \
  --title "PULSE, five spread requests, three seeds"

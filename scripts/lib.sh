# Shared by the results scripts: `run OUTFILE CMD...` runs CMD into OUTFILE unless OUTFILE exists
# (so a script re-run does only what is missing), writing to OUTFILE.tmp first (atomic).
run() {
  local out=$1; shift
  if [ -s "$out" ]; then echo "skip $out"; return; fi
  echo "== $*" >&2
  local started=$SECONDS
  "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
  echo "   $(( SECONDS - started )) s -> $out" >&2
}

# Sourced by setup.sh and kvpress_venv.sh once VENV is set (the venv folder must exist before the
# first call). The machine's local package indexes print one warning per missing project;
# `quiet CMD...` runs CMD, hides only those lines and returns CMD's own status.
quiet() {
  local status
  # grep exits 1 when it prints nothing; only the command's own status matters.
  { "$@" 2>&1; echo "exit=$?" > "$VENV/.quiet-status"; } \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  status=$(sed 's/exit=//' "$VENV/.quiet-status")
  rm -f "$VENV/.quiet-status"
  return "$status"
}

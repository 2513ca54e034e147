# The Debian packages the scripts install when missing: the one list that
# scripts/dev-up.sh, scripts/test.sh and .ci/run read (sourced), and that
# README's "The two commands" names (scripts/check-prerequisites.py checks
# both). The Rust toolchain itself (rustup, Rust >= Cargo.toml's
# rust-version) is not a Debian package: install it with rustup.

# What each script needs.
# shellcheck disable=SC2034
PREREQUISITES_DEV_UP=(build-essential redis-server postgresql)
# shellcheck disable=SC2034
PREREQUISITES_TEST=(build-essential redis-server postgresql python3-pip)
# shellcheck disable=SC2034
PREREQUISITES_CI=(build-essential redis-server postgresql python3-pip python3-venv)

# Prints each of the given packages that is not installed yet, judged by
# what it provides.
missing_packages() {
  local package
  for package in "$@"; do
    case "$package" in
      build-essential) command -v cc >/dev/null 2>&1 ;;
      redis-server) command -v redis-server >/dev/null 2>&1 ;;
      postgresql) compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null ;;
      python3-pip) python3 -m pip --version >/dev/null 2>&1 ;;
      python3-venv) python3 -c 'import ensurepip, venv' >/dev/null 2>&1 ;;
      *) echo "prerequisites.sh: no check for $package" >&2; false ;;
    esac || echo "$package"
  done
}

# Installs the given packages with apt-get, as root or through sudo; fails
# with what to do when neither is possible.
install_packages() {
  [ $# -eq 0 ] && return 0
  echo "==> installing Debian packages: $*"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
      echo "error: installing $* needs root; run as root or install them yourself (apt-get install $*)" >&2
      return 1
    fi
  fi
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

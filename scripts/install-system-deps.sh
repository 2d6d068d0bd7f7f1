#!/usr/bin/env bash
# Installs the Debian packages that the tests need and the npm registry cannot
# provide: etcd (server and etcdctl) for the storage tests, and protoc with the
# gRPC Python plugin, grpcio and protobuf for the Python client test.
# Returns at once when every package is already installed, and runs
# `apt-get update` only when something is missing.
set -euo pipefail

packages=(
  etcd-server
  etcd-client
  protobuf-compiler
  protobuf-compiler-grpc
  python3-grpcio
  python3-protobuf
)

# Files that the tests run directly. A package counts as missing when dpkg
# does not list it as installed or when its file is gone.
declare -A required_file=(
  [etcd-server]=/usr/bin/etcd
  [etcd-client]=/usr/bin/etcdctl
  [protobuf-compiler]=/usr/bin/protoc
  [protobuf-compiler-grpc]=/usr/bin/grpc_python_plugin
)

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "error: dpkg-query not found; this script installs Debian packages and needs Debian 12 or a derivative" >&2
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null || true)
  file=${required_file[$package]:-}
  if [[ "$status" != "installed" ]] || [[ -n "$file" && ! -x "$file" ]]; then
    missing+=("$package")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system packages: all ${#packages[@]} installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "error: missing Debian packages: ${missing[*]}" >&2
  echo "Installing them needs root. Run as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The lock timeout makes apt wait for another dpkg run, such as an automatic
# update at boot, to finish instead of failing at once.
apt-get -o DPkg::Lock::Timeout=300 update -q
apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"

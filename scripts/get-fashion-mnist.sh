#!/bin/sh
# Make sure the Fashion-MNIST idx files are where fasterai.examples looks ($FASHION_MNIST_DIR).
dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then exit 0; fi
if [ -n "$FASHION_MNIST_DIR" ]; then
  echo "FASHION_MNIST_DIR=$dir holds no Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ...)." >&2; exit 1
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "Installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist"
    $sudo apt-get update -q && $sudo apt-get install -y -q dataset-fashion-mnist && exit 0
  fi
fi
cat >&2 <<MSG
Fashion-MNIST is missing and could not be installed with apt-get here.
On Debian or Ubuntu:  sudo apt-get install -y dataset-fashion-mnist
Elsewhere: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz in a folder and set FASHION_MNIST_DIR to it.
MSG
exit 1

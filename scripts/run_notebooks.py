"""Execute every notebook in nbs/; with --write, save the outputs back into the files."""
import sys
from pathlib import Path

import nbclient
import nbformat

NBS = Path(__file__).resolve().parent.parent / 'nbs'


def run(path, write=False):
    "Execute one notebook top to bottom in its folder; returns the executed notebook."
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(NBS)}}).execute()
    if write: nbformat.write(nb, path)
    return nb


if __name__ == '__main__':
    for p in sorted(NBS.glob('*.ipynb')):
        print(p.name); run(p, write='--write' in sys.argv)

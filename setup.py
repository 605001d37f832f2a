from pathlib import Path

from setuptools import find_packages, setup

version = next(l.split("'")[1] for l in Path('fasterai/__init__.py').read_text().splitlines()
               if l.startswith('__version__'))

setup(
    name='fasterai',
    version=version,
    description='Make neural networks lighter inside ordinary fastai training: sparsify, then prune exactly.',
    long_description=Path('README.md').read_text() if Path('README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['fasterai', 'fasterai.*']),
    python_requires='>=3.10',
    install_requires=['torch>=2.4', 'fastai>=2.7.15,<2.9', 'numpy'],
    extras_require={
        'dev': ['pytest>=8', 'torchvision>=0.19', 'nbformat>=5.9', 'nbclient>=0.9', 'ipykernel>=6.25',
                'matplotlib>=3.7', 'hypothesis>=6.100', 'onnx>=1.16', 'onnxscript>=0.1', 'onnxruntime>=1.18', 'timm>=1.0.20',
                'accelerate>=1.0'],
    },
    license='Apache-2.0',
)

"""rmjax: reward modeling and RL fine-tuning in JAX, built to study reward-model overoptimization."""
import re
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'rmjax' / '__init__.py').read_text()).group(1)

INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'flax>=0.12',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12',
    'chex>=0.1.90',
    'ml-collections>=1.1',
    'tensorflow-datasets>=4.9.10',
    'array-record>=0.8',
    'grain>=0.2.18',
    'absl-py>=2.0',
    'tqdm>=4.66',
    'tensorboardX>=2.6',
    'matplotlib>=3.8',
    'numpy>=2.0',
    'safetensors>=0.4',
    'tokenizers>=0.20',
    'jinja2>=3.1',
    'jaxtyping>=0.3',
    'submitit>=1.5',
]

setup(
    name='rmjax',
    version=VERSION,
    description=__doc__,
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['rmjax', 'rmjax.*', 'experiments', 'experiments.*', 'launch', 'launch.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.6', 'hypothesis>=6.100'],
        # Parity tests against transformers (torch 2.13.0 is the CPU build on these machines).
        'hf': ['torch==2.13.0', 'transformers>=5.24'],
    },
)

"""moejax: sparse Mixture-of-Experts research framework in JAX/Flax."""

import setuptools

setuptools.setup(
    name='moejax',
    version='0.1.0',
    description='Sparse Mixture-of-Experts layers, routers and experiments '
                'in JAX/Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=setuptools.find_packages(include=['moejax', 'moejax.*']),
    python_requires='>=3.10',
    install_requires=[
        'absl-py',
        'array_record',  # TFDS's on-disk format without TensorFlow
        'flax>=0.10',
        'grain',
        'jax>=0.6',
        'matplotlib',  # run plots (loss curves, expert load)
        'ml-collections',
        'numpy',
        'optax',
        'orbax-checkpoint',
        # Hugging Face checkpoints in and out (moejax.interop.hf): the
        # format's own reader/writer, numpy API, no torch.
        'safetensors',
        'tensorboardX',  # TensorBoard event files without TensorFlow
        'tensorflow-datasets',
        'tokenizers',  # tokenizer.json of imported models (--prompt TEXT)
        'tqdm',  # progress bar
    ],
    extras_require={
        'test': [
            'pytest', 'hypothesis',
            # tests/test_notebooks.py executes notebooks/ in a python3
            # kernel: nbclient (Jupyter's own executor) + nbformat to read
            # and validate them, ipykernel for the kernel.
            'nbclient', 'nbformat', 'ipykernel',
            # pytest -n 2: the suite is compile-bound (XLA on CPU is mostly
            # single-threaded), so two workers on two cores ~halve it.
            'pytest-xdist',
        ],
    },
)

from setuptools import find_packages, setup

setup(
    name="fairseq-smoe",
    version="0.1.0",
    description="Stratified Mixture of Experts (SMoE) for multilingual MT as a fairseq user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["fairseq_smoe", "fairseq_smoe.*", "data_prep", "data_prep.*"]),
    # Pinned to what is tested on Python 3.11 (see shared docs/environment.md): ve-fairseq is
    # fairseq main (2024-10) with the Python 3.11 dataclass fix, as a prebuilt wheel.
    install_requires=[
        "torch==2.13.0",
        "ve-fairseq==0.12.3",
        "torchaudio==2.11.1",
        "hydra-core==1.3.8",
        "omegaconf==2.3.1",
        "numpy==2.4.6",
        "sacrebleu==2.6.0",
        "sentencepiece==0.2.3",
        "sacremoses==0.2.0",
        # fairseq-train --tensorboard-logdir: fairseq falls back to tensorboardX when
        # torch.utils.tensorboard (the tensorboard package) is missing; neither needs torch
        "tensorboardX==2.6.5",
        "protobuf==7.36.2",
        # python -m fairseq_smoe.analyze draws its figures (Agg backend, no display)
        "matplotlib==3.10.7",
    ],
    # m15: the authors release m15.zip on Google Drive; gdown fetches it (scripts/prepare_data.sh m15)
    extras_require={"test": ["pytest==9.2.0"], "m15": ["gdown==6.5.1"]},
)

from setuptools import find_packages, setup

setup(
    name="lakelens",
    version="0.1.0",
    description="Natural-language image search over a data lake: CLIP on Spark, Delta tables, FAISS.",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"lakelens.models": ["model_configs/*.json"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["lakelens=lakelens.cli:main"]},
)

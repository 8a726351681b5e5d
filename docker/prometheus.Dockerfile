# Prometheus without a registry: Debian's prometheus binary plus every library `ldd` names and
# the loader, gathered by scripts/build-prometheus-image into docker/build/prometheus/, which
# is this image's build context. Only the compose profile "observability" uses it. With
# registry access use PROMETHEUS_IMAGE=prom/prometheus instead (docs/observability.md).
FROM scratch
COPY rootfs/ /
# The TSDB lives in the container (a demo's metrics, not an archive); its user must own it.
COPY --chown=65534:65534 data/ /prometheus/
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--storage.tsdb.retention.time=2d", "--web.listen-address=0.0.0.0:9090"]

# Redis without a registry: the host's redis-server and redis-cli plus every library `ldd`
# names and the loader, gathered by scripts/build-images into docker/build/redis/rootfs.
# With registry access use REDIS_IMAGE=redis:7 instead (README.md, "Running with Docker").
FROM scratch
COPY docker/build/redis/rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65534:65534
EXPOSE 6379
ENTRYPOINT []
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", ""]

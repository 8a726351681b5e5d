# The offline path: nothing is pulled. scripts/build-images puts the statically linked
# release binary (built on the host) and the host's CA bundle into docker/build/gateway/.
# Same layout as the multi-stage ../Dockerfile.
FROM scratch
COPY docker/build/gateway/deltastream-gateway /usr/local/bin/deltastream-gateway
COPY docker/build/gateway/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65534:65534
EXPOSE 8000 9000
HEALTHCHECK --interval=5s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/deltastream-gateway", "probe", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["/usr/local/bin/deltastream-gateway"]
CMD ["serve"]

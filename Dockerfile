# llimit in a small image: python slim, non-root, database in the /data volume.
# Build: docker build -t llimit .
# Run:   docker run -p 127.0.0.1:8000:8000 -e LLIMIT_ADMIN_TOKEN=... -v llimit-data:/data llimit

# Chart.js from the npm registry, so the pages draw charts on an intranet without internet:
# the very file, version and integrity hash llimit's pages name on the CDN
# (CHARTJS_CDN_URL and CHARTJS_CDN_INTEGRITY in llimit.py); the build fails on any other.
FROM node:20-slim AS chartjs
ARG CHARTJS_VERSION=4.6.1
ARG CHARTJS_SHA384=Emf5ZVIUiarAdhkgtqK+5/Z5qIvM6QoVrS+qAVtfyZVuD5lIHrac0me485+Antp0
WORKDIR /tmp/chartjs
RUN npm pack --silent "chart.js@${CHARTJS_VERSION}" && tar xzf "chart.js-${CHARTJS_VERSION}.tgz" \
    && node -e 'const [file, want] = process.argv.slice(1); const got = require("crypto").createHash("sha384").update(require("fs").readFileSync(file)).digest("base64"); if (got !== want) { console.error(`chart.js: sha384 ${got}, expected ${want}`); process.exit(1); }' \
       package/dist/chart.umd.min.js "${CHARTJS_SHA384}" \
    && cp package/dist/chart.umd.min.js /chart.umd.js

FROM python:3.12-slim
WORKDIR /app
# The same install step as README.md's first command.
COPY requirements.txt requirements-postgres.txt ./
# The PostgreSQL driver too, so the image also runs with LLIMIT_DB=postgresql://...
RUN pip install --no-cache-dir -r requirements.txt -r requirements-postgres.txt
COPY llimit.py pricing.json ./
COPY --from=chartjs /chart.umd.js /app/static/chart.umd.js
# A bind-mounted /data must belong to this uid (README: `chown 10001`).
RUN useradd --system --uid 10001 --home-dir /data llimit \
    && mkdir -p /data && chown llimit /data
USER llimit
ENV LLIMIT_HOST=0.0.0.0 \
    LLIMIT_PORT=8000 \
    LLIMIT_DB=/data/llimit.db \
    LLIMIT_CHARTJS=/app/static/chart.umd.js \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8000
# Asks the port llimit listens on, also when `-e LLIMIT_PORT=...` moves it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLIMIT_PORT', '8000'), timeout=4)" || exit 1
# The same start command as README.md's first command; SIGTERM lets open streams finish.
CMD ["python", "llimit.py"]

# llimit in a small image: python slim, non-root, database in the /data volume.
# Build: docker build -t llimit .
# Run:   docker run -p 8000:8000 -e LLIMIT_ADMIN_TOKEN=... -v llimit-data:/data llimit

# Chart.js from the npm registry, so the pages draw charts on an intranet without internet.
FROM node:20-slim AS chartjs
WORKDIR /tmp/chartjs
RUN npm pack --silent chart.js@4 && tar xzf chart.js-*.tgz && cp package/dist/chart.umd.js /chart.umd.js

FROM python:3.12-slim
WORKDIR /app
# The same install step as README.md's first command.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY llimit.py pricing.json ./
COPY --from=chartjs /chart.umd.js /app/static/chart.umd.js
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
# The same start command as README.md's first command; SIGTERM lets open streams finish.
CMD ["python", "llimit.py"]

# One image for every role: `docker run IMAGE router ...`, or --role / ETLROUTER_ROLE in Kubernetes.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin etlrouter \
 && mkdir -p /var/lib/etlrouter && chown etlrouter:etlrouter /var/lib/etlrouter
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/etlrouter
ENV ETLROUTER_LOGGING__FORMAT=json
EXPOSE 7400 7480 7500 7580
ENTRYPOINT ["etlrouter"]
CMD ["--help"]

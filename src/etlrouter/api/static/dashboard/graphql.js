// The dashboard's only way to the router: GraphQL over HTTP POST (queries, mutations) and graphql-transport-ws
// (subscriptions), both at `graphql` relative to the page, so the page works behind any path prefix.

export function endpoint(base = document.baseURI) {
  const http = new URL("graphql", base);
  const ws = new URL(http);
  ws.protocol = http.protocol === "https:" ? "wss:" : "ws:";
  return { http: http.href, ws: ws.href };
}

// With authentication on, the page sends a bearer token (kept for this tab only, in sessionStorage).
const TOKEN_KEY = "etlrouter.token";
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}
export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}
let authNeeded = () => {};
// `handler(message)` runs when the API asks for credentials (HTTP 401, WebSocket close 4403).
export function onAuthNeeded(handler) {
  authNeeded = handler;
}

export class ApiError extends Error {
  constructor(message, { unreachable = false, code = "" } = {}) {
    super(message);
    this.unreachable = unreachable;
    this.code = code;
  }
}

// One query or mutation; resolves to `data`, rejects with ApiError naming what went wrong.
export async function request(url, query, variables = {}, timeoutMs = 15000) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(token() ? { Authorization: `Bearer ${token()}` } : {}) },
      body: JSON.stringify({ query, variables }),
      signal: controller.signal,
    });
  } catch (e) {
    throw new ApiError(`the GraphQL API at ${url} is unreachable (${e.name === "AbortError" ? "timed out" : e.message})`, { unreachable: true });
  } finally {
    clearTimeout(timer);
  }
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError(`the GraphQL API at ${url} answered HTTP ${response.status} without JSON`, { unreachable: response.status >= 500 });
  }
  if (response.status === 401) authNeeded(body.errors?.[0]?.message ?? "the API asks for a token");
  if (body.errors && body.errors.length) {
    const first = body.errors[0];
    throw new ApiError(first.message, { code: first.extensions?.code ?? "" });
  }
  return body.data;
}

// A graphql-transport-ws connection that reconnects with backoff and re-subscribes what was subscribed.
// `onStatus({state, attempt, retryInMs, error})` reports: connecting, live, lost.
export class LiveConnection {
  constructor(url, onStatus) {
    this.url = url;
    this.onStatus = onStatus;
    this.subscriptions = new Map(); // id -> {query, variables, onData, onError}
    this.nextId = 1;
    this.attempt = 0;
    this.socket = null;
    this.closed = false;
    this.everLive = false;
    this.connect();
  }

  subscribe(query, variables, onData, onError = () => {}) {
    const id = String(this.nextId++);
    this.subscriptions.set(id, { query, variables, onData, onError });
    this.send({ id, type: "subscribe", payload: { query, variables } });
    return () => {
      this.subscriptions.delete(id);
      this.send({ id, type: "complete" });
    };
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN && this.acked) {
      this.socket.send(JSON.stringify(message));
    }
  }

  connect() {
    this.acked = false;
    this.onStatus({ state: "connecting", attempt: this.attempt });
    let socket;
    try {
      socket = new WebSocket(this.url, "graphql-transport-ws");
    } catch (e) {
      this.retry(String(e));
      return;
    }
    this.socket = socket;
    socket.onopen = () => socket.send(JSON.stringify({
      type: "connection_init", payload: token() ? { authorization: `Bearer ${token()}` } : {},
    }));
    socket.onmessage = (event) => this.onMessage(event.data);
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (event.code === 4403) authNeeded(event.reason || "the API asks for a token");
      const why = event.reason || (event.code === 1006 ? "connection failed or dropped" : `closed (${event.code})`);
      this.retry(why);
    };
  }

  onMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.type === "connection_ack") {
      this.acked = true;
      const reconnected = this.everLive;
      this.everLive = true;
      this.attempt = 0;
      this.onStatus({ state: "live", reconnected });
      for (const [id, sub] of this.subscriptions) {
        this.socket.send(JSON.stringify({ id, type: "subscribe", payload: { query: sub.query, variables: sub.variables } }));
      }
    } else if (message.type === "ping") {
      this.socket?.send(JSON.stringify({ type: "pong" }));
    } else if (message.type === "next") {
      const sub = this.subscriptions.get(message.id);
      if (!sub) return;
      if (message.payload.errors?.length) sub.onError(message.payload.errors[0].message);
      if (message.payload.data) sub.onData(message.payload.data);
    } else if (message.type === "error") {
      this.subscriptions.get(message.id)?.onError(message.payload?.[0]?.message ?? "subscription failed");
    }
  }

  retry(error) {
    if (this.closed) return;
    this.attempt += 1;
    const retryInMs = Math.min(10000, 500 * 2 ** Math.min(this.attempt - 1, 5));
    this.onStatus({ state: "lost", attempt: this.attempt, retryInMs, error });
    setTimeout(() => this.connect(), retryInMs);
  }

  close() {
    this.closed = true;
    this.socket?.close();
  }

  // Connect again now (new credentials), whatever the backoff was waiting for.
  restart() {
    const old = this.socket;
    this.socket = null;
    old?.close();
    this.attempt = 0;
    this.connect();
  }
}

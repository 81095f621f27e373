/**
 * The admin API client: the session (a JWT kept in memory and in session
 * storage, so a reload keeps it but a closed tab forgets it), JSON calls, and
 * the API's error shape turned into readable messages.
 */

export interface User {
  id: string;
  username: string;
  role: "admin" | "user";
}

export interface Session {
  token: string;
  expires_at: number;
  user: User;
}

const STORAGE = "fastgate.session";

/** Why the last session ended, shown on the login page. */
export const ended = { reason: "" };

let current: Session | null = load();

function load(): Session | null {
  try {
    const s = JSON.parse(sessionStorage.getItem(STORAGE) ?? "null") as Session | null;
    return s && s.expires_at * 1000 > Date.now() ? s : null;
  } catch {
    return null;
  }
}

export function session(): Session | null {
  if (current && current.expires_at * 1000 <= Date.now()) end("Your session expired. Log in again.");
  return current;
}

const listeners = new Set<() => void>();

/** Called whenever the session starts or ends. */
export function onSessionChange(f: () => void): () => void {
  listeners.add(f);
  return () => listeners.delete(f);
}

export function end(reason = ""): void {
  current = null;
  ended.reason = reason;
  sessionStorage.removeItem(STORAGE);
  listeners.forEach((f) => f());
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

/** A JSON call to the admin API; throws `ApiError` with the server's message. */
export async function api<T>(path: string, init: RequestInit = {}): Promise<T> {
  const headers = new Headers(init.headers);
  if (current) headers.set("authorization", `Bearer ${current.token}`);
  if (init.body && !headers.has("content-type")) headers.set("content-type", "application/json");
  let r: Response;
  try {
    r = await fetch(path, { ...init, headers });
  } catch {
    throw new ApiError(0, "network", "The admin service cannot be reached.");
  }
  if (r.status === 401 && current) {
    end("Your session expired. Log in again.");
  }
  const text = await r.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!r.ok) {
    const e = (body as { error?: { code?: string; message?: string } } | null)?.error;
    throw new ApiError(r.status, e?.code ?? String(r.status), e?.message ?? (text || r.statusText));
  }
  return body as T;
}

export async function login(username: string, password: string): Promise<Session> {
  const s = await api<Session>("/api/auth/login", {
    method: "POST",
    body: JSON.stringify({ username, password }),
  });
  current = s;
  ended.reason = "";
  sessionStorage.setItem(STORAGE, JSON.stringify(s));
  listeners.forEach((f) => f());
  return s;
}

/** `Authorization` for calls made outside `api` (the event stream). */
export function authHeader(): Record<string, string> {
  return current ? { authorization: `Bearer ${current.token}` } : {};
}

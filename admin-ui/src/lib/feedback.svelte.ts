import { ApiError } from "./api";

/** A readable message for whatever a call threw. */
export function messageOf(e: unknown): string {
  if (e instanceof ApiError || e instanceof Error) return e.message;
  return String(e);
}

/** A page's last outcome: what was done (`notice`) or why it was not (`error`). */
export class Feedback {
  notice = $state("");
  error = $state("");

  /**
   * Run `call`. On success show `label` (or the text `call` returns) and
   * run `then` (a reload, say); on failure show the server's message.
   */
  async run(label: string, call: () => Promise<unknown>, then?: () => Promise<unknown>): Promise<boolean> {
    this.notice = "";
    this.error = "";
    try {
      const result = await call();
      this.notice = typeof result === "string" && result ? result : label;
      if (then) await then();
      return true;
    } catch (e) {
      this.error = messageOf(e);
      return false;
    }
  }
}

import type { IncomingMessage } from "node:http";
import { Webhook, WebhookVerificationError } from "standardwebhooks";

/** The body walhook sends: the Standard Webhooks envelope around an outbox row's payload. */
export interface WalhookEvent<Type extends string = string, Data = Record<string, unknown>> {
  type: Type;
  version?: number; // the catalog version of data, for types in the event catalog (docs/catalog.md)
  timestamp: string; // the outbox row's created_at, RFC 3339
  data: Data;
}

/** walhook's own events, published under the reserved `walhook.` prefix. */
export type OperationalEvent =
  | WalhookEvent<"walhook.endpoint.disabled", {
      endpoint_id: number; url: string; description: string | null; tenant: string | null;
      cause: "manual" | "gone" | "failing"; reason: string | null; disabled_at: string;
    }>
  | WalhookEvent<"walhook.endpoint.breaker_opened" | "walhook.endpoint.breaker_closed", {
      endpoint_id: number; url: string; tenant: string | null; open_until: string | null;
      consecutive_failures: number; last_status_code: number | null; last_error: string | null;
      changed_at: string;
    }>
  | WalhookEvent<"walhook.delivery.dead", {
      delivery_id: number; endpoint_id: number; url: string; tenant: string | null; event_id: number;
      webhook_id: string; event_type: string; event_tenant: string | null; attempts: number;
      last_status_code: number | null; last_error: string | null; last_attempt_at: string | null;
      dead_at: string;
    }>
  | WalhookEvent<"walhook.recovery.finished", {
      recovery_id: number; kind: "recover" | "slot"; endpoint_id: number | null; tenant: string | null;
      event_type: string | null; since: string; until: string; deliveries: number;
      recovered_by: string; finished_at: string;
    }>
  | WalhookEvent<"walhook.test">;

const webhook = new Webhook(process.env.WEBHOOK_SECRET!);

/** The request's webhook-id and event once its signature and timestamp check out; null when they do not. */
export function verify(request: IncomingMessage, body: Buffer): { webhookId: string; event: WalhookEvent } | null {
  try {
    const event = webhook.verify(body, request.headers as Record<string, string>) as WalhookEvent;
    return { webhookId: String(request.headers["webhook-id"]), event };
  } catch (error) {
    if (error instanceof WebhookVerificationError) return null;
    throw error;
  }
}

export function isOperational(event: WalhookEvent): event is OperationalEvent {
  return event.type.startsWith("walhook.");
}

/** A line for the operator's log: the type narrows `data`. */
export function describe(event: WalhookEvent): string {
  if (!isOperational(event)) return event.type;
  switch (event.type) {
    case "walhook.endpoint.disabled":
      return `endpoint ${event.data.endpoint_id} disabled (${event.data.cause}): ${event.data.reason}`;
    case "walhook.delivery.dead":
      return `${event.data.event_type} to endpoint ${event.data.endpoint_id} dead: ${event.data.last_error}`;
    default:
      return event.type;
  }
}

/** sys/ routes: wrapping. */
import type { Core } from '../core';
import type { RouteDef } from '../framework';

export function wrappingRoutes(_core: Core): RouteDef[] {
  return [];
}

/** sys/ routes: auth. */
import type { Core } from '../core';
import type { RouteDef } from '../framework';

export function authRoutes(_core: Core): RouteDef[] {
  return [];
}

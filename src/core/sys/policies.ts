/** sys/policy, sys/policies/acl and sys/capabilities* routes. */
import type { Core } from '../core';
import type { RouteDef } from '../framework';

export function policyRoutes(_core: Core): RouteDef[] {
  return [];
}

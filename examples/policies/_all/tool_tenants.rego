# Refunds move money: only tenants on the list may call the refund tool.
package aob.policies.tool_tenants

refund_tenants := {"acme"}

deny contains reason if {
	input.kind == "tool"
	input.tool.name == "payments.refund"
	not input.tenant in refund_tenants
	reason := sprintf("tool payments.refund is not enabled for tenant %s", [input.tenant])
}

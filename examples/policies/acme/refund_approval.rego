# acme refunds above 1000 wait for a person to approve them.
package aob.policies.refund_approval

approval_above := 1000

require_approval contains reason if {
	input.kind == "tool"
	input.tool.name == "payments.refund"
	input.arguments.amount > approval_above
	reason := sprintf("refund of %v is above %v and needs approval", [input.arguments.amount, approval_above])
}

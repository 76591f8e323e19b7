# A run may spend at most $0.50 on models; the call that would start above it is refused.
package aob.policies.spend_cap

run_cap_usd := 0.50

deny contains reason if {
	input.kind == "model"
	input.spend.run_usd >= run_cap_usd
	reason := sprintf("run spend $%.2f reached the cap of $%.2f per run", [input.spend.run_usd, run_cap_usd])
}

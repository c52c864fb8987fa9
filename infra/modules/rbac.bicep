// Role assignments. The app's user-assigned identity gets exactly what the code and the
// Functions host use; the deployer (optional) gets what infra/deploy.sh needs to write the
// secrets and to drop a first request on the queue; the deployer and the operators get what the
// operations tools (tools.ledger, .status, .poison, .enqueue) need from a laptop (infra/README.md,
// "Operator roles").

@description('Principal (object) id of the app\'s user-assigned managed identity.')
param identityPrincipalId string

@description('Storage account of the relay.')
param storageAccountName string

@description('Key Vault of the relay.')
param keyVaultName string

@description('Application Insights component of the relay.')
param applicationInsightsName string

@description('Queue the deployer and the producers may send requests to.')
param mailQueueName string

@description('Container where producers put claim-check requests and blob attachments, each under `requests/<name>/`.')
param claimCheckContainerName string

@description('The priority lane\'s queue: producers may send to it as to the mail queue.')
param priorityQueueName string = 'outbound-mail-priority'

@description('Poison queue of the mail queue.')
param poisonQueueName string = '${mailQueueName}-poison'

@description('Object id of the person or pipeline running the deployment (empty: no deployer roles).')
param deployerPrincipalId string = ''

@description('Type of the deployer principal.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

@description('Named producers, normalised by main.bicep: [{ name (lower-case, as in BLOB_PRODUCERS), principalId, principalType }]. Each gets queue Message Sender on the mail queue and Storage Blob Data Contributor on the claim-check container, conditioned on its own prefix `requests/<name>/`.')
param producers array = []

@description('Queue-only producers: object ids that get queue Message Sender on the mail queue and nothing else.')
param producerPrincipalIds array = []

@description('Principal type of producerPrincipalIds.')
@allowed([
  'ServicePrincipal'
  'User'
  'Group'
])
param producerPrincipalType string = 'ServicePrincipal'

@description('Object ids of further operators (people, groups or pipelines) who run the operations tools against this deployment.')
param operatorPrincipalIds array = []

@description('Type of every operatorPrincipalIds entry.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param operatorPrincipalType string = 'User'

// The deployer is an operator too; union() drops a deployer listed again.
var operatorIds = union(empty(deployerPrincipalId) ? [] : [
  deployerPrincipalId
], operatorPrincipalIds)

// Built-in role definition ids (the same in every tenant).
var roles = {
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  storageQueueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageTableDataReader: '76199698-9eea-4c19-bc75-cec21354c6b6'
}

// The condition on a producer's Storage Blob Data Contributor (condition version 2.0): every blob
// data action (read, write, add, delete) is allowed only on blobs whose name starts with the
// producer's prefix, and listing only with a prefix under it; '{container}' and '{prefix}' are
// replaced per producer. The relay reads a blob only under `requests/<producer>/<request id>/`
// (shared/send/blobs.py), so a producer can neither read, overwrite nor plant another's blobs.
var producerBlobConditionTemplate = '''
(
 (
  !(ActionMatches{'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'} AND NOT SubOperationMatches{'Blob.List'})
  AND !(ActionMatches{'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write'})
  AND !(ActionMatches{'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action'})
  AND !(ActionMatches{'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete'})
 )
 OR
 (
  @Resource[Microsoft.Storage/storageAccounts/blobServices/containers:name] StringEquals '{container}'
  AND @Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringStartsWith '{prefix}'
 )
)
AND
(
 (
  !(ActionMatches{'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'} AND SubOperationMatches{'Blob.List'})
 )
 OR
 (
  @Resource[Microsoft.Storage/storageAccounts/blobServices/containers:name] StringEquals '{container}'
  AND @Request[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:prefix] StringStartsWith '{prefix}'
 )
)
'''

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource mailQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  name: '${storageAccountName}/default/${mailQueueName}'
}

resource claimCheckContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  name: '${storageAccountName}/default/${claimCheckContainerName}'
}

resource priorityQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  name: '${storageAccountName}/default/${priorityQueueName}'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  name: '${storageAccountName}/default/${poisonQueueName}'
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// Queue trigger, poison queue and retries (the host and the app code).
resource appQueueData 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, roles.storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Ledger, recipient index, governor and welcome state tables.
resource appTableData 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, roles.storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Host leases and secrets, the Flex deployment package and claim-check payloads.
resource appBlobData 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// HVE passwords (read by the code) and the recipient hash key (Key Vault reference).
resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, identityPrincipalId, roles.keyVaultSecretsUser)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Entra-authenticated telemetry (local authentication is disabled on the component).
resource appMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identityPrincipalId, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Deployer: write the HVE passwords and the recipient hash key.
resource deployerSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(keyVault.id, deployerPrincipalId, roles.keyVaultSecretsOfficer)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

// Deployer: put a first request on the mail queue (this queue only).
resource deployerQueueSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(deployerPrincipalId)) {
  name: guid(mailQueue.id, deployerPrincipalId, roles.storageQueueDataMessageSender)
  scope: mailQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: deployerPrincipalId
    principalType: deployerPrincipalType
  }
}

// Producers (the `producers` and `producerPrincipalIds` parameters of main.bicep). The relay's
// own container (RELAY_STATE_CONTAINER) is never granted to anybody here, and the HTTP routes
// need no role: the function key or Entra token is the caller's credential there.
// One assignment per principal, role and scope (guid of the three): a principal may appear once
// across `producers`, `producerPrincipalIds` and the deployer; renaming a producer updates its
// condition in place.

// Named producers: put requests on the mail queue (this queue only: they cannot peek, read or
// delete other producers' requests). A second producer queue (e.g. a priority queue) needs a loop
// like this one scoped to it.
resource producerQueueSenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for producer in producers: {
  name: guid(mailQueue.id, producer.principalId, roles.storageQueueDataMessageSender)
  scope: mailQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: producer.principalId
    principalType: producer.principalType
    description: 'hve-relay producer ${producer.name}: send requests to ${mailQueueName}'
  }
}]

// The priority lane's queue too (MAIL_QUEUE_PRIORITY): the same right, the other lane.
resource producerPriorityQueueSenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for producer in producers: {
  name: guid(priorityQueue.id, producer.principalId, roles.storageQueueDataMessageSender)
  scope: priorityQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: producer.principalId
    principalType: producer.principalType
    description: 'hve-relay producer ${producer.name}: send requests to ${priorityQueueName}'
  }
}]

// Named producers: claim checks and blob attachments, only under requests/<name>/ of the
// claim-check container.
resource producerBlobWriters 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for producer in producers: {
  name: guid(claimCheckContainer.id, producer.principalId, roles.storageBlobDataContributor)
  scope: claimCheckContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: producer.principalId
    principalType: producer.principalType
    description: 'hve-relay producer ${producer.name}: blobs under requests/${producer.name}/ only'
    conditionVersion: '2.0'
    condition: replace(replace(producerBlobConditionTemplate, '{container}', claimCheckContainerName), '{prefix}', 'requests/${producer.name}/')
  }
}]

// Queue-only producers: the mail queue, nothing else (no blob prefix without a name).
resource queueOnlyProducerSenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in producerPrincipalIds: {
  name: guid(mailQueue.id, principalId, roles.storageQueueDataMessageSender)
  scope: mailQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: principalId
    principalType: producerPrincipalType
    description: 'hve-relay queue-only producer: send requests to ${mailQueueName}'
  }
}]

resource queueOnlyProducerPrioritySenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in producerPrincipalIds: {
  name: guid(priorityQueue.id, principalId, roles.storageQueueDataMessageSender)
  scope: priorityQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: principalId
    principalType: producerPrincipalType
    description: 'hve-relay queue-only producer: send requests to ${priorityQueueName}'
  }
}]

// Operators: read the ledger, recipient index, delivery, governor, aggregates and welcome tables
// (tools.ledger summary/show/lookup/report, tools.status, tools.welcome --dry-run). Read only.
resource operatorTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for id in operatorIds: {
  name: guid(storage.id, id, roles.storageTableDataReader)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataReader)
    principalId: id
    principalType: (id == deployerPrincipalId) ? deployerPrincipalType : operatorPrincipalType
  }
}]

// Operators: peek, receive and delete poison messages (tools.poison list/requeue), read the
// queue's depth (tools.ledger report). This queue only.
resource operatorPoisonQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for id in operatorIds: {
  name: guid(poisonQueue.id, id, roles.storageQueueDataContributor)
  scope: poisonQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: id
    principalType: (id == deployerPrincipalId) ? deployerPrincipalType : operatorPrincipalType
  }
}]

// Operators: put requests back (tools.poison requeue) or new ones (tools.enqueue) on the mail
// queue, and read its depth and oldest message (tools.ledger report). This queue only.
resource operatorMailQueue 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for id in operatorIds: {
  name: guid(mailQueue.id, id, roles.storageQueueDataContributor)
  scope: mailQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: id
    principalType: (id == deployerPrincipalId) ? deployerPrincipalType : operatorPrincipalType
  }
}]
